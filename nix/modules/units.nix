# The app host: system users and the three units (migrate oneshot, app, worker), each
# sandboxed by ./hardening.nix.
{
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) users splitData splitApp localData;
  hardening = import ./hardening.nix;

  dataHost =
    if splitData
    then cfg.network.dataAddress
    else "127.0.0.1";
  dataHostUrl =
    if common.isIPv6 dataHost
    then "[${dataHost}]"
    else dataHost;

  # Units that must be up first when PostgreSQL/RabbitMQ run on this host.
  localDataUnits = lib.optionals localData ["postgresql.target" "rabbitmq.service" "pageviews-rabbitmq-setup.service"];
  secretUnits = lib.optional (common.generatedSecrets != []) "pageviews-secrets.service";

  # Builds DATABASE_URL / AMQP_URL from credentials at start, then execs the binary:
  # the passwords stay in systemd's credential store, never in the Nix store or argv.
  mkStart = {
    name,
    role,
    args ? "",
    amqp ? true,
  }:
    pkgs.writeShellScript "${name}-start" ''
      set -eu
      urlsafe() {
        case "$1" in
          "" | *[!A-Za-z0-9._~-]*)
            echo "$2 must be non-empty and URL-safe (A-Za-z0-9._~-)" >&2
            exit 1
            ;;
        esac
      }
      ${
        if splitData
        then ''
          db_password="$(cat "$CREDENTIALS_DIRECTORY/db-password")"
          urlsafe "$db_password" "the ${role} database password"
          export DATABASE_URL="postgres://${role}:$db_password@${dataHostUrl}:${toString cfg.database.port}/${cfg.database.name}"
        ''
        else ''
          export DATABASE_URL="postgres://${role}@/${cfg.database.name}?host=/run/postgresql"
        ''
      }
      ${lib.optionalString amqp ''
        amqp_password="$(cat "$CREDENTIALS_DIRECTORY/amqp-password")"
        urlsafe "$amqp_password" "the ${role} RabbitMQ password"
        export AMQP_URL="amqp://${role}:$amqp_password@${dataHostUrl}:${toString cfg.rabbitmq.port}/${cfg.rabbitmq.vhost}"
      ''}
      exec ${cfg.package}/bin/${name} ${args}
    '';

  environment = lib.mapAttrs (_: v:
    if builtins.isBool v
    then lib.boolToString v
    else toString v)
  (lib.filterAttrs (_: v: v != null) cfg.settings);

  # IP allow-list: loopback, plus the data host and (for the app) the proxies when split.
  ipAllow = extra: ["localhost"] ++ lib.optional splitData cfg.network.dataAddress ++ extra;
  appIpAllow = ipAllow (lib.optionals splitApp cfg.network.proxyAddresses);

  # The app's socket (pageviews-app.socket); the app itself ignores PAGEVIEWS_LISTEN when
  # the socket is passed.
  appListen = cfg.settings.PAGEVIEWS_LISTEN;
  # Both binaries ping at half of it (WATCHDOG_USEC); a wedged runtime is restarted.
  watchdogSec = "10s";

  mkUnit = {
    role,
    description,
    dbPasswordFile,
    amqpWho ? null,
    extra ? {},
  }:
    lib.mkMerge [
      {
        inherit description environment;
        wants = ["network-online.target"] ++ localDataUnits ++ secretUnits;
        after = ["network-online.target"] ++ localDataUnits ++ secretUnits;
        serviceConfig =
          hardening
          // {
            User = role;
            Group = role;
            LoadCredential =
              lib.optional (splitData && dbPasswordFile != null) "db-password:${dbPasswordFile}"
              ++ lib.optional (amqpWho != null) "amqp-password:${common.amqpPasswordFile amqpWho}";
            IPAddressDeny = "any";
          };
        unitConfig.StartLimitIntervalSec = 0;
      }
      extra
    ];
in {
  config = lib.mkIf (cfg.enable && common.localApp) {
    users.users = lib.genAttrs (lib.attrValues users) (name: {
      isSystemUser = true;
      group = name;
      description = "pageviews service user";
    });
    users.groups = lib.genAttrs (lib.attrValues users) (_: {});

    systemd.services = {
      # Applies pending diesel migrations as the schema owner, then exits.
      pageviews-migrate = mkUnit {
        role = users.owner;
        description = "pageviews: database migrations";
        dbPasswordFile = cfg.database.passwordFiles.owner;
        extra = {
          # The database must be there; on one host wait for postgresql-setup's roles.
          requires = lib.optional localData "postgresql.target";
          after = lib.optional localData "postgresql.target";
          serviceConfig = {
            Type = "oneshot";
            RemainAfterExit = true;
            ExecStart = mkStart {
              name = "pageviews-app";
              role = users.owner;
              args = "migrate";
              amqp = false;
            };
            IPAddressAllow = ipAllow [];
            # A remote database may not be up yet: retry instead of failing the boot.
            Restart = "on-failure";
            RestartSec = "5s";
          };
        };
      };

      pageviews-app = mkUnit {
        role = users.app;
        description = "pageviews: HTTP app";
        dbPasswordFile = cfg.database.passwordFiles.app;
        amqpWho = "app";
        extra = {
          wantedBy = ["multi-user.target"];
          requires = ["pageviews-migrate.service" "pageviews-app.socket"];
          after = ["pageviews-migrate.service" "pageviews-app.socket"];
          # A changed unit is restarted, not stopped and started: for a socket-activated
          # service, stop-and-start makes switch-to-configuration stop the socket too,
          # refusing connections during the deploy.
          stopIfChanged = false;
          serviceConfig = {
            # READY=1 once the database answers; WATCHDOG=1 from the async runtime.
            Type = "notify";
            WatchdogSec = watchdogSec;
            ExecStart = mkStart {
              name = "pageviews-app";
              role = users.app;
            };
            # No RuntimeDirectory: removed at every stop, it would take the socket file
            # (owned by pageviews-app.socket) with it.
            IPAddressAllow = appIpAllow;
            Restart = "always";
            RestartSec = "2s";
          };
        };
      };

      pageviews-worker = mkUnit {
        role = users.worker;
        description = "pageviews: background worker";
        dbPasswordFile = cfg.database.passwordFiles.worker;
        amqpWho = "worker";
        extra = {
          wantedBy = ["multi-user.target"];
          requires = ["pageviews-migrate.service"];
          after = ["pageviews-migrate.service"];
          serviceConfig = {
            # READY=1 once it consumes; WATCHDOG=1 from the async runtime.
            Type = "notify";
            WatchdogSec = watchdogSec;
            ExecStart = mkStart {
              name = "pageviews-worker";
              role = users.worker;
            };
            IPAddressAllow = ipAllow [];
            Restart = "always";
            RestartSec = "2s";
          };
        };
      };
    };

    # Owns the app's listening socket, passed to each app process (LISTEN_FDS): it outlives
    # the app, so a restart or a deploy makes connections wait in its backlog (Backlog=
    # defaults to SOMAXCONN) instead of being refused.
    systemd.sockets.pageviews-app = {
      description = "pageviews: the app's listening socket";
      wantedBy = ["sockets.target"];
      listenStreams = [appListen];
      socketConfig =
        {
          # A passed socket is filtered by the socket unit's list, not the service's.
          IPAddressDeny = "any";
          IPAddressAllow = appIpAllow;
        }
        // (
          if lib.hasPrefix "/" appListen
          then {
            # nginx reaches it through the app's group; the directory is created 0755.
            SocketUser = users.app;
            SocketGroup = users.app;
            SocketMode = "0660";
          }
          else {
            # The private address may not be configured yet when sockets are bound.
            FreeBind = true;
          }
        );
    };

    # Operators and tests can run the end-to-end probe: pageviews-probe https://DOMAIN/
    environment.systemPackages = [cfg.package];
  };
}
