# The app host: system users and the three units (migrate oneshot, app, worker). Their
# serviceConfig comes whole from ./service-config.nix (pure; sandboxing from ./hardening.nix),
# which scripts/systemd-score scores: nothing here adds to or overrides it.
{
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) users splitData splitApp localData;

  dataHost =
    if splitData
    then cfg.network.dataAddress
    else "127.0.0.1";
  dataHostUrl =
    if common.isIPv6 dataHost
    then "[${dataHost}]"
    else dataHost;

  # Units that must be up first when PostgreSQL/RabbitMQ run on this host.
  localDataUnits =
    lib.optionals localData ["postgresql.target"]
    ++ lib.optionals common.localBroker ["rabbitmq.service" "pageviews-rabbitmq-setup.service"];
  # One URL per broker node: the nodes of the cluster, or the data host.
  amqpHosts =
    if common.clustered
    then map common.urlHost common.brokerAddresses
    else [dataHostUrl];
  secretUnits = lib.optional (common.generatedSecrets != []) "pageviews-secrets.service";

  # The settings of services.pageviews, as the binaries read them.
  settingsEnvironment = lib.mapAttrs (_: v:
    if builtins.isBool v
    then lib.boolToString v
    else toString v)
  (lib.filterAttrs (_: v: v != null) cfg.settings);

  # DATABASE_URL and AMQP_URL of a role, without passwords: the binaries read those from the
  # unit's credentials and put them into the URLs themselves, so neither the store nor argv
  # ever holds one. `passwordFile`: the path of a credential; `url`: how a URL is written.
  inherit (common.serviceConfig) credentials;
  connectionEnvironment = {
    role,
    amqp ? true,
  }: passwordFile: url:
    (
      if splitData
      then {
        DATABASE_URL = url "postgres://${role}@${common.databaseUrlHosts}/${cfg.database.name}${common.databaseUrlQuery}";
        PAGEVIEWS_DATABASE_PASSWORD_FILE = passwordFile credentials.database;
      }
      else {
        DATABASE_URL = url "postgres://${role}@/${cfg.database.name}?host=/run/postgresql";
      }
    )
    // lib.optionalAttrs amqp {
      AMQP_URL = url (lib.concatMapStringsSep "," (host: "amqp://${role}@${host}:${toString cfg.rabbitmq.port}/${cfg.rabbitmq.vhost}") amqpHosts);
      PAGEVIEWS_AMQP_PASSWORD_FILE = passwordFile credentials.broker;
    };
  roles = {
    migrate = {
      role = users.owner;
      amqp = false;
    };
    app.role = users.app;
    worker.role = users.worker;
  };
  # In the unit, `%d` is its credentials directory (systemd.unit(5), "Specifiers"); a `%` of
  # a URL is written `%%`, which systemd passes on as `%`.
  # A role's whole environment: the settings and its connections, passwords as files.
  environmentOf = name: passwordFile: url: settingsEnvironment // connectionEnvironment roles.${name} passwordFile url;
  unitEnvironment = name: environmentOf name (credential: "%d/${credential}") (lib.replaceStrings ["%"] ["%%"]);

  # The settings as each binary loads them, checked when the system is built (attic's
  # checkedConfigFile pattern): `check-config` over each unit's environment, so a bad setting
  # fails `nixos-rebuild build` instead of the unit's start. The credentials are not in the
  # build: a placeholder (no secret) stands in for each password file. $out keeps the
  # effective settings (`check-config --json`, passwords left out).
  placeholderPassword = pkgs.writeText "pageviews-check-placeholder-password" "placeholder";
  checkConfig = name: program: ''
    env -i ${lib.escapeShellArgs (lib.mapAttrsToList (n: v: "${n}=${v}") (environmentOf name (_: "${placeholderPassword}") lib.id))} \
      ${cfg.package}/bin/${program} check-config --json > "$out/${name}.json"
  '';
  checkedSettings = pkgs.runCommand "pageviews-checked-settings" {} ''
    mkdir -p "$out"
    ${checkConfig "app" "pageviews-app"}
    ${checkConfig "worker" "pageviews-worker"}
  '';

  # `pageviews-admin …` = `pageviews-app admin …` with the app's environment, user and
  # credentials, in a transient unit (atticadm's pattern): nothing secret on the command line
  # or in the store. One at a time: systemd refuses a second unit of the same name.
  adminUnit = "pageviews-admin";
  adminWrapper = pkgs.writeShellScriptBin "pageviews-admin" ''
    exec ${config.systemd.package}/bin/systemd-run --quiet --pipe --wait --collect \
      --unit=${adminUnit} \
      ${lib.escapeShellArgs (
      ["--property=User=${users.app}" "--property=Group=${users.app}"]
      ++ map (c: "--property=LoadCredential=${c}") serviceConfigs.pageviews-app.LoadCredential
      ++ lib.mapAttrsToList (n: v: "--setenv=${n}=${v}") (environmentOf "app" (c: "/run/credentials/${adminUnit}.service/${c}") lib.id)
    )} \
      ${cfg.package}/bin/pageviews-app admin "$@"
  '';

  serviceConfigs = common.serviceConfig.units {
    owner = cfg.database.owner;
    inherit splitData splitApp;
    inherit (cfg.network) dataAddress proxyAddresses;
    # (and the database hosts: the units' IP allow-list)
    brokerAddresses = common.brokerAddresses ++ common.databaseAddresses;
    dbPasswordFiles = cfg.database.passwordFiles;
    amqpPasswordFiles = cfg.rabbitmq.passwordFiles;
    migrated = "${config.systemd.package}/bin/systemctl is-active --quiet pageviews-migrate.service";
    execStart = {
      migrate = "${cfg.package}/bin/pageviews-app migrate";
      app = "${cfg.package}/bin/pageviews-app";
      worker = "${cfg.package}/bin/pageviews-worker";
    };
  };

  mkUnit = {
    name,
    description,
    extra ? {},
  }:
    lib.mkMerge [
      {
        inherit description;
        environment = unitEnvironment (lib.removePrefix "pageviews-" name);
        wants = ["network-online.target"] ++ localDataUnits ++ secretUnits;
        after = ["network-online.target"] ++ localDataUnits ++ secretUnits;
        serviceConfig = serviceConfigs.${name};
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
      # A deploy (switch-to-configuration) restarts changed units in place (stopIfChanged =
      # false) instead of stopping them before the activation and starting them after: the
      # migrations, then (ordered after them) the app, whose socket holds connections
      # meanwhile, and the worker. app and worker only Want the migrations: Requires= would
      # make systemd stop them with it, for the whole activation (nix/eval/scenarios.nix
      # `switchNewPackage` models this).
      pageviews-migrate = mkUnit {
        name = "pageviews-migrate";
        description = "pageviews: database migrations";
        extra = {
          # The database must be there; on one host wait for postgresql-setup's roles.
          requires = lib.optional localData "postgresql.target";
          after = lib.optional localData "postgresql.target";
          stopIfChanged = false;
        };
      };

      pageviews-app = mkUnit {
        name = "pageviews-app";
        description = "pageviews: HTTP app";
        extra = {
          wantedBy = ["multi-user.target"];
          requires = ["pageviews-app.socket"];
          wants = ["pageviews-migrate.service"];
          after = ["pageviews-migrate.service" "pageviews-app.socket"];
          # Stop-and-start would also make switch-to-configuration stop the socket, refusing
          # connections during the deploy.
          stopIfChanged = false;
        };
      };

      pageviews-worker = mkUnit {
        name = "pageviews-worker";
        description = "pageviews: background worker";
        extra = {
          wantedBy = ["multi-user.target"];
          wants = ["pageviews-migrate.service"];
          after = ["pageviews-migrate.service"];
          stopIfChanged = false;
        };
      };
    };

    # Owns the app's listening socket, passed to each app process (LISTEN_FDS): it outlives
    # the app, so a restart or a deploy makes connections wait in its backlog (Backlog=
    # defaults to SOMAXCONN) instead of being refused. The app ignores PAGEVIEWS_LISTEN when
    # the socket is passed.
    systemd.sockets.pageviews-app = {
      description = "pageviews: the app's listening socket";
      wantedBy = ["sockets.target"];
      listenStreams = [cfg.settings.PAGEVIEWS_LISTEN];
      socketConfig =
        common.serviceConfig.appSocket {
          inherit splitData splitApp;
          inherit (cfg.network) dataAddress proxyAddresses;
        }
        cfg.settings.PAGEVIEWS_LISTEN;
    };

    system.checks = [checkedSettings];

    # pageviews-app, pageviews-worker (check-config) and the admin tool.
    environment.systemPackages = [cfg.package adminWrapper];
  };
}
