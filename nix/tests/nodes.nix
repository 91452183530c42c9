# What the VM tests share: node configuration (NixOS modules), the constants their scripts
# take from the nodes, and how those scripts are made. Each vm-*.nix starts with
# `args: let shared = import ./nodes.nix args;` (args: default.nix's).
{
  pkgs,
  module,
  tls,
  secrets,
  # Lazy: only the client nodes read it (the nixos-eval harness evaluates the others without it).
  probe ? throw "nix/tests: the probe package is an argument (flake.nix passes build.probe)",
  ...
}: let
  caEtc = "pageviews-test/ca.pem";

  # Constants every script gets, besides the test's own (see `script`).
  base = {
    DOMAIN = tls.domain;
    CA_FILE = "/etc/${caEtc}";
    # epmd's fixed port (services.epmd, which services.rabbitmq enables).
    EPMD_PORT = 4369;
    SECURITY_THRESHOLD = (import ../modules/service-config.nix).exposureThreshold;
  };

  # The constants of each part of the stack, read from the configuration of the node that
  # runs it (scripts/check-vm-tests evaluates their names with a stub node).
  fromPart = {
    # the app and the worker
    app = node: let
      inherit (node.services.pageviews) network settings;
      units = node.systemd.services;
    in {
      APP_PORT = network.appPort;
      APP_LISTEN = settings.PAGEVIEWS_LISTEN;
      WORKER_METRICS = settings.PAGEVIEWS_METRICS_LISTEN;
      # The units' WatchdogSec, as `systemctl show` prints WatchdogUSec.
      APP_WATCHDOG = units.pageviews-app.serviceConfig.WatchdogSec;
      WORKER_WATCHDOG = units.pageviews-worker.serviceConfig.WatchdogSec;
    };
    # PostgreSQL
    data = node: {
      PG_PORT = node.services.pageviews.database.port;
    };
    # RabbitMQ
    broker = node: let
      inherit (node.services.pageviews) rabbitmq;
    in {
      AMQP_PORT = rabbitmq.port;
      # RabbitMQ's inter-node port: the AMQP port + 20000.
      ERLANG_DIST_PORT = rabbitmq.port + 20000;
      VHOST = rabbitmq.vhost;
      # rabbitmqctl reads the node's Erlang cookie from the rabbitmq user's home.
      RABBITMQ_HOME = node.services.rabbitmq.dataDir;
    };
    # all three on one node
    stack = node: fromPart.app node // fromPart.data node // fromPart.broker node;
  };

  # Tools the scripts call besides what NixOS always ships (curl, nc, getent are there).
  tools = {
    environment.systemPackages = [pkgs.curl pkgs.iproute2];
  };

  # The test certificate for the public name, on the host that serves HTTPS.
  certificate = {
    services.pageviews.tls = {
      certificateFile = tls.cert;
      keyFile = tls.key;
    };
  };

  # `pageviews-sql 'SELECT …'` on a data host: psql as the superuser on the pageviews
  # database, unaligned tuples only, stops on the first error.
  sql = {config, ...}: {
    environment.systemPackages = [
      (pkgs.writeShellScriptBin "pageviews-sql" ''
        exec ${pkgs.util-linux}/bin/runuser -u postgres -- \
          ${config.services.postgresql.package}/bin/psql -X -q -t -A \
          -v ON_ERROR_STOP=1 -d ${config.services.pageviews.database.name} -c "$1"
      '')
    ];
  };

  # Enough memory for PostgreSQL + RabbitMQ (Erlang) + the app on one VM.
  sized = memorySize: {
    virtualisation.memorySize = memorySize;
    virtualisation.cores = 2;
  };

  # A node's address on the test network.
  ip = nodes: name: nodes.${name}.networking.primaryIPAddress;

  # `member where roles`: a host of a deployment split over several nodes, running `roles`
  # with the test's fixed passwords (secrets.nix); `where` is the test's module saying where
  # the others are (services.pageviews.network, a cluster's nodes).
  member = where: roles: {
    imports = [module tools where];
    services.pageviews = {
      enable = true;
      inherit roles;
      inherit (tls) domain;
      database.passwordFiles = secrets.database;
      rabbitmq.passwordFiles = secrets.rabbitmq;
    };
  };
in {
  inherit tools certificate sql sized ip member;

  # The Python the test driver runs: the values the nodes are built with, as constants
  # (`base` and the test's `constants nodes`; scripts/check-vm-tests reads only their
  # names), then common.py, then the test's own script.
  script = file: constants: {nodes, ...}:
    pkgs.lib.concatStrings (pkgs.lib.mapAttrsToList (name: value: "${name} = ${builtins.toJSON value}\n") (base // constants nodes))
    + builtins.readFile ./common.py
    + builtins.readFile file;

  # `constantsOf {app = nodes.app1; data = nodes.db; broker = nodes.broker1;}`: the
  # constants of the parts of the stack a test has (app, data, broker, or `stack` for all
  # three on one node), each from the node that runs it. A test adds its own with `//`.
  constantsOf = parts:
    builtins.foldl' (acc: part: acc // fromPart.${part} parts.${part}) {} (builtins.attrNames parts);

  # The outside world: trusts the test CA, resolves the public name to the node that
  # serves HTTPS, and has the end-to-end probe.
  client = server: {nodes, ...}: {
    networking.hosts.${ip nodes server} = [tls.domain];
    security.pki.certificateFiles = [tls.ca];
    environment.etc.${caEtc}.source = tls.ca;
    environment.systemPackages = [probe pkgs.curl];
  };

  # The whole stack on one host, as `nixos-rebuild switch` gives it with nothing but
  # `services.pageviews.enable` and a certificate.
  stack = {
    imports = [module certificate sql tools (sized 2048)];
    services.pageviews = {
      enable = true;
      inherit (tls) domain;
    };
  };

  # vm-split's hosts (vm-deploy has the same): `split roles`, a member of client -> proxy
  # -> app -> data.
  split = member ({nodes, ...}: {
    services.pageviews.network = {
      appAddress = ip nodes "app";
      dataAddress = ip nodes "data";
      proxyAddresses = [(ip nodes "proxy")];
    };
  });

  # `behindProxy apps`: where a member of a deployment with several app hosts (`apps`, node
  # names) behind `proxy` finds them; an app host listens on its own address.
  behindProxy = apps: {
    nodes,
    config,
    ...
  }: {
    services.pageviews.network = {
      appAddress =
        if builtins.elem "app" config.services.pageviews.roles
        then config.networking.primaryIPAddress
        else null;
      appAddresses = map (ip nodes) apps;
      proxyAddresses = [(ip nodes "proxy")];
    };
  };

  # `brokerCluster names`: the RabbitMQ cluster of the broker hosts `names` (node names), as
  # every member of the deployment sees it.
  brokerCluster = names: {nodes, ...}: {
    services.pageviews.rabbitmq.cluster = {
      nodes =
        map (name: {
          hostName = name;
          address = ip nodes name;
        })
        names;
      cookieFile = secrets.erlangCookie;
    };
  };
}
