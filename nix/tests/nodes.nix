# Node configuration shared by the VM tests (NixOS modules), and how their scripts are made.
{
  pkgs,
  probe,
  tls,
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
in {
  # The Python the test driver runs: the values the nodes are built with, as constants
  # (`base` and the test's `constants nodes`; scripts/check-vm-tests reads only their
  # names), then common.py, then the test's own script.
  script = file: constants: {nodes, ...}:
    pkgs.lib.concatStrings (pkgs.lib.mapAttrsToList (name: value: "${name} = ${builtins.toJSON value}\n") (base // constants nodes))
    + builtins.readFile ./common.py
    + builtins.readFile file;

  # The outside world: trusts the test CA, resolves the public name to the node that
  # serves HTTPS, and has the end-to-end probe.
  client = server: {nodes, ...}: {
    networking.hosts.${nodes.${server}.networking.primaryIPAddress} = [tls.domain];
    security.pki.certificateFiles = [tls.ca];
    environment.etc.${caEtc}.source = tls.ca;
    environment.systemPackages = [probe pkgs.curl];
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

  # Tools the scripts call besides what NixOS always ships (curl, nc, getent are there).
  tools = {
    environment.systemPackages = [pkgs.curl pkgs.iproute2];
  };
}
