# The data host: PostgreSQL (database, schema-owner role, runtime roles with only the
# grants they need) and RabbitMQ (vhost, one user per service, no guest).
{
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) users splitData clustered;
  # In a cluster: this broker host's entry, and whether it is the first (it creates the
  # vhost and users, which the cluster shares).
  self = lib.findFirst (n: n.hostName == config.networking.hostName) null cfg.rabbitmq.cluster.nodes;
  seed = !clustered || (self != null && self == lib.head cfg.rabbitmq.cluster.nodes);
  db = cfg.database.name;
  runtimeRoles = [users.app users.worker];
  rabbitmqctl = "${config.services.rabbitmq.package}/sbin/rabbitmqctl";
in {
  config = lib.mkIf (cfg.enable && (common.localData || common.localBroker)) {
    services.postgresql = lib.mkIf common.localData {
      enable = true;
      # `package` is left to nixpkgs: its postgresql module picks the major version from
      # system.stateVersion (PostgreSQL 17 for 25.11 and later) with mkDefault, so that an
      # existing host keeps the version its data directory was made with. A second mkDefault
      # here would be "defined multiple times"; a higher priority would move old hosts to a
      # new, empty data directory. Pin it on the host (services.postgresql.package) if wanted.
      ensureDatabases = [db];
      ensureUsers =
        [
          {
            name = users.owner;
            ensureDBOwnership = true;
            ensureClauses.login = true;
          }
        ]
        ++ map (name: {
          inherit name;
          ensureClauses = {
            login = true;
            superuser = false;
            createdb = false;
            createrole = false;
          };
        })
        runtimeRoles;
      # Split: listen on all addresses (nixpkgs sets listen_addresses from this), and accept
      # only the app host, only with SCRAM. One host: the defaults (peer over the socket).
      enableTCPIP = splitData;
      authentication = lib.optionalString splitData (lib.concatMapStrings (client:
        lib.concatMapStrings (role: ''
          host ${db} ${role} ${common.hostCidr client} scram-sha-256
        '') (lib.attrValues users))
      cfg.network.dataClients);
      settings = {
        port = cfg.database.port;
        password_encryption = "scram-sha-256";
      };
    };

    # Access rules and (split) passwords, on every start of postgresql-setup, as the superuser:
    # src/db/setup.sql, the file the tests run (the grants there, migrations/README.md says
    # why). Passwords reach the server only as SCRAM-SHA-256 verifiers, made here from the
    # credentials and handed to psql in its environment (never argv, the store or SQL text).
    systemd.services.postgresql-setup = lib.mkIf common.localData {
      serviceConfig.LoadCredential = lib.mkIf splitData (lib.mapAttrsToList (who: file: "db-${who}:${file}") cfg.database.passwordFiles);
      script = lib.mkAfter ''
        ${lib.optionalString splitData (lib.concatMapStrings (who: let
          var = "PAGEVIEWS_${lib.toUpper who}_VERIFIER";
        in ''
          ${var}="$(${cfg.package}/bin/pageviews-app scram-verifier < "$CREDENTIALS_DIRECTORY/db-${who}")"
          export ${var}
        '') (lib.attrNames users))}
        psql -d ${lib.escapeShellArg db} ${lib.escapeShellArgs (lib.mapAttrsToList (name: value: "--variable=${name}=${value}") ({inherit db;} // users))} \
          ${lib.optionalString splitData "--variable=passwords=1"} -f ${../../src/db/setup.sql}
      '';
    };

    services.rabbitmq = lib.mkIf common.localBroker {
      enable = true;
      # Loopback on one host (the module's default), the private address when split or
      # clustered.
      listenAddress =
        if clustered
        then (lib.throwIf (self == null) "services.pageviews.rabbitmq.cluster.nodes has no node with this host's networking.hostName" self).address
        else if splitData
        then cfg.network.dataAddress
        else "127.0.0.1";
      inherit (cfg.rabbitmq) port;
      configItems = {
        "loopback_users.guest" = "true";
        # Twice the largest valid task (README, "Task messages"); RabbitMQ's default is 128 MiB.
        "max_message_size" = "65536";
      };
    };

    # RabbitMQ has no NixOS options for users: src/queue/rabbitmq-setup.sh (the file the tests
    # run) creates the vhost and one user per service with the permissions its client needs,
    # and deletes guest. Passwords come from files via credentials and reach rabbitmqctl on
    # stdin, never argv. Runs on every boot (idempotent, re-applies changed passwords).
    systemd.services.pageviews-rabbitmq-setup = lib.mkIf (common.localBroker && seed) {
      description = "pageviews: RabbitMQ vhost, users and permissions";
      wantedBy = ["multi-user.target"];
      requires = ["rabbitmq.service"] ++ lib.optional (common.generatedSecrets != []) "pageviews-secrets.service";
      after = ["rabbitmq.service"] ++ lib.optional (common.generatedSecrets != []) "pageviews-secrets.service";
      partOf = ["rabbitmq.service"];
      environment.HOME = config.services.rabbitmq.dataDir;
      path = [pkgs.coreutils pkgs.gnugrep];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        # rabbitmqctl authenticates to the node with the Erlang cookie in rabbitmq's home.
        User = "rabbitmq";
        Group = "rabbitmq";
        LoadCredential = map (who: "amqp-${who}:${common.amqpPasswordFile who}") ["app" "worker"];
        UMask = "0077";
      };
      # Run by the bash that runs this unit's script ($BASH): the file is a plain bash script.
      script = ''
        "$BASH" ${../../src/queue/rabbitmq-setup.sh} ${rabbitmqctl} ${lib.escapeShellArgs [cfg.rabbitmq.vhost users.app]} \
          "$CREDENTIALS_DIRECTORY/amqp-app" ${lib.escapeShellArg users.worker} "$CREDENTIALS_DIRECTORY/amqp-worker"
      '';
    };
  };
}
