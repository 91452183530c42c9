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

  # The names of the credentials (LoadCredential=) holding a unit's passwords; the binaries
  # read them as `%d/<name>` (PAGEVIEWS_DATABASE_PASSWORD_FILE, PAGEVIEWS_AMQP_PASSWORD_FILE).
  credentials = {
    database = "db-password";
    broker = "amqp-password";
  };

  # Both binaries ping at half of it (WATCHDOG_USEC); a wedged runtime is restarted.
  watchdogSec = "10s";

  optional = cond: x:
    if cond
    then [x]
    else [];

  # IP allow-list: loopback, plus the data host and (for the app) the proxies when split.
  ipAllowList = {
    splitData,
    dataAddress,
    brokerAddresses ? [],
    ...
  }: extra: ["localhost"] ++ optional (splitData && dataAddress != null) dataAddress ++ brokerAddresses ++ extra;
  appIpAllowList = args @ {
    splitApp,
    proxyAddresses,
    ...
  }:
    ipAllowList args (
      if splitApp
      then proxyAddresses
      else []
    );

  # The socketConfig of pageviews-app.socket, which owns the app's listening socket
  # (`listen`: PAGEVIEWS_LISTEN) and passes it to each app process (LISTEN_FDS). `args`: those
  # of `units` that the allow-list needs.
  appSocket = args: listen:
    {
      # A passed socket is filtered by the socket unit's list, not the service's.
      IPAddressDeny = "any";
      IPAddressAllow = appIpAllowList args;
    }
    // (
      if builtins.substring 0 1 listen == "/"
      then {
        # nginx reaches it through the app's group; the directory is created 0755.
        SocketUser = (users null).app;
        SocketGroup = (users null).app;
        SocketMode = "0660";
      }
      else {
        # The private address may not be configured yet when sockets are bound.
        FreeBind = true;
      }
    );

  # Arguments: the values of services.pageviews that the units depend on (plain data), and
  # the ExecStart command lines (the binaries themselves: store paths in the module,
  # placeholders for the score).
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
    migrated,
  }: let
    u = users owner;
    # IP allow-list: loopback, plus the data host (and the nodes of a RabbitMQ cluster) and
    # (for the app) the proxies when split.
    ipAllow = ipAllowList {inherit splitData dataAddress brokerAddresses;};
    # Credentials: the database password only when split (peer auth on one host), the
    # broker password always.
    dbCredential = file: optional (splitData && file != null) "${credentials.database}:${file}";
    amqpCredential = who: ["${credentials.broker}:${amqpPasswordFile amqpPasswordFiles who}"];
    base = user:
      hardening
      // {
        User = user;
        Group = user;
        IPAddressDeny = "any";
      };
    appIpAllow = appIpAllowList {inherit splitData splitApp dataAddress proxyAddresses brokerAddresses;};
    # app and worker: long-running, restarted whatever the exit, both credentials;
    # READY=1 (app: once the database answers; worker: once it consumes) and WATCHDOG=1
    # from the async runtime. They start only once the migrations succeeded: ordered after
    # pageviews-migrate and checking it (`migrated`, outside the sandbox: "+"), where
    # Requires= would also stop them whenever that unit is stopped, as a deploy does.
    daemon = who: extra:
      base u.${who}
      // {
        Type = "notify";
        WatchdogSec = watchdogSec;
        ExecStartPre = "+${migrated}";
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

    # No RuntimeDirectory: removed at every stop, it would take the socket file (owned by
    # pageviews-app.socket, see `appSocket`) with it.
    pageviews-app = daemon "app" {
      IPAddressAllow = appIpAllow;
    };

    pageviews-worker = daemon "worker" {
      IPAddressAllow = ipAllow [];
    };
  };
in {
  inherit hardening secretsDir users amqpPasswordFile credentials units appSocket watchdogSec;

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
      migrate = "/nix/store/00000000000000000000000000000000-pageviews/bin/pageviews-app migrate";
      app = "/nix/store/00000000000000000000000000000000-pageviews/bin/pageviews-app";
      worker = "/nix/store/00000000000000000000000000000000-pageviews/bin/pageviews-worker";
    };
    migrated = "/nix/store/00000000000000000000000000000000-systemd/bin/systemctl is-active --quiet pageviews-migrate.service";
  };
}
