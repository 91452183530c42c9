# The systemd `serviceConfig` of pageviews-migrate, pageviews-app and pageviews-worker:
# the one copy. Pure (builtins only, neither nixpkgs nor lib), like ./hardening.nix, so
#   nix-instantiate --eval --strict --json -A singleHost nix/modules/service-config.nix
# prints what a host gets with every services.pageviews option at its default.
# nix/modules/units.nix calls `units` with the values of services.pageviews, and
# scripts/systemd-score renders `singleHost` into unit files for systemd-analyze.
let
  hardening = import ./hardening.nix;

  # Generated broker passwords (one host, passwordFiles left at null) live here.
  secretsDir = "/var/lib/pageviews-secrets";

  # System users, which are also the PostgreSQL roles and the RabbitMQ users.
  users = owner: {
    inherit owner;
    app = "pageviews-app";
    worker = "pageviews-worker";
  };

  # A broker password file: the option's value, or the generated one where it is null.
  amqpPasswordFile = files: who:
    if files.${who} != null
    then files.${who}
    else "${secretsDir}/amqp-${who}";

  optional = cond: x:
    if cond
    then [x]
    else [];

  # Arguments: the values of services.pageviews that the units depend on (plain data), and
  # the ExecStart programs (store paths in the module, placeholders for the score).
  units = {
    owner,
    splitData,
    splitApp,
    dataAddress,
    proxyAddresses,
    brokerAddresses,
    dbPasswordFiles,
    amqpPasswordFiles,
    execStart,
  }: let
    u = users owner;
    # IP allow-list: loopback, plus the data host (and the nodes of a RabbitMQ cluster) and
    # (for the app) the proxies when split.
    ipAllow = extra: ["localhost"] ++ optional splitData dataAddress ++ brokerAddresses ++ extra;
    # Credentials: the database password only when split (peer auth on one host), the
    # broker password always.
    dbCredential = file: optional (splitData && file != null) "db-password:${file}";
    amqpCredential = who: ["amqp-password:${amqpPasswordFile amqpPasswordFiles who}"];
    base = user:
      hardening
      // {
        User = user;
        Group = user;
        IPAddressDeny = "any";
      };
    # app and worker: long-running, restarted whatever the exit, both credentials.
    daemon = who: extra:
      base u.${who}
      // {
        Type = "exec";
        ExecStart = execStart.${who};
        LoadCredential = dbCredential dbPasswordFiles.${who} ++ amqpCredential who;
        Restart = "always";
        RestartSec = "2s";
      }
      // extra;
  in {
    # Applies pending diesel migrations as the schema owner, then exits.
    pageviews-migrate =
      base u.owner
      // {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = execStart.migrate;
        LoadCredential = dbCredential dbPasswordFiles.owner;
        IPAddressAllow = ipAllow [];
        # A remote database may not be up yet: retry instead of failing the boot.
        Restart = "on-failure";
        RestartSec = "5s";
      };

    pageviews-app = daemon "app" {
      # The Unix socket lives here; nginx reaches it through the group.
      RuntimeDirectory = "pageviews-app";
      RuntimeDirectoryMode = "0750";
      IPAddressAllow = ipAllow (
        if splitApp
        then proxyAddresses
        else []
      );
    };

    pageviews-worker = daemon "worker" {
      IPAddressAllow = ipAllow [];
    };
  };
in {
  inherit hardening secretsDir users amqpPasswordFile units;

  # The most `systemd-analyze security` may score each unit, in tenths (15 = 1.5 on its 0-10
  # scale): scripts/systemd-score and the VM tests check against it.
  exposureThreshold = 15;

  # One host, every services.pageviews option at its default (database.owner "pageviews",
  # no password files, all roles here). scripts/check-vm-tests checks the owner against
  # nix/modules/default.nix; the nixos-eval scenarios compare this with what units.nix
  # deploys on such a host.
  singleHost = units {
    owner = "pageviews";
    splitData = false;
    splitApp = false;
    dataAddress = null;
    proxyAddresses = [];
    brokerAddresses = [];
    dbPasswordFiles = {
      owner = null;
      app = null;
      worker = null;
    };
    amqpPasswordFiles = {
      app = null;
      worker = null;
    };
    execStart = {
      migrate = "/nix/store/00000000000000000000000000000000-pageviews-app-start";
      app = "/nix/store/00000000000000000000000000000000-pageviews-app-start";
      worker = "/nix/store/00000000000000000000000000000000-pageviews-worker-start";
    };
  };
}
