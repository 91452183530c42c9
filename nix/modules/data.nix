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
  quoted = role: ''"${role}"'';
  runtimeList = lib.concatMapStringsSep ", " quoted runtimeRoles;
  rabbitmqctl = "${config.services.rabbitmq.package}/sbin/rabbitmqctl";
  # Names the app and worker declare at connect: exchange pageviews, queues pageviews.tasks
  # and pageviews.dead, exchange pageviews.dead.
  permission = ''^pageviews(\..*)?$'';
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

    # Grants (idempotent, on every start of postgresql-setup, as the superuser): runtime
    # roles get CONNECT, USAGE on the schema and SELECT/INSERT/UPDATE on the owner's tables,
    # now and for tables the migrations create later (ALTER DEFAULT PRIVILEGES).
    # Split: set the role passwords from credentials (psql reads the file itself, so the
    # password is neither in argv nor in the store).
    systemd.services.postgresql-setup = lib.mkIf common.localData {
      serviceConfig.LoadCredential = lib.mkIf splitData (lib.mapAttrsToList (who: file: "db-${who}:${file}") cfg.database.passwordFiles);
      script = lib.mkAfter ''
        psql -d ${db} -v ON_ERROR_STOP=1 <<'EOF'
          REVOKE ALL ON DATABASE ${db} FROM PUBLIC;
          GRANT CONNECT ON DATABASE ${db} TO ${runtimeList};
          REVOKE CREATE ON SCHEMA public FROM PUBLIC;
          GRANT USAGE ON SCHEMA public TO ${runtimeList};
          GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO ${runtimeList};
          GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO ${runtimeList};
          ALTER DEFAULT PRIVILEGES FOR ROLE ${quoted users.owner} IN SCHEMA public
            GRANT SELECT, INSERT, UPDATE ON TABLES TO ${runtimeList};
          ALTER DEFAULT PRIVILEGES FOR ROLE ${quoted users.owner} IN SCHEMA public
            GRANT USAGE, SELECT ON SEQUENCES TO ${runtimeList};
        EOF
        ${lib.optionalString splitData (lib.concatStrings (lib.mapAttrsToList (who: role: ''
            psql -d postgres -v ON_ERROR_STOP=1 <<'EOF'
              \set pw `cat "$CREDENTIALS_DIRECTORY/db-${who}"`
              ALTER ROLE ${quoted role} PASSWORD :'pw';
            EOF
          '')
          users))}
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

    # RabbitMQ has no NixOS options for users: create the vhost and one user per service
    # with permissions on that vhost only, and delete guest. Passwords come from files via
    # credentials and reach rabbitmqctl on stdin, never argv. Runs on every boot (idempotent,
    # re-applies changed passwords).
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
      script = ''
        set -eu
        ${rabbitmqctl} await_startup --timeout 300
        if ! ${rabbitmqctl} list_vhosts --quiet --no-table-headers | grep -qxF '${cfg.rabbitmq.vhost}'; then
          ${rabbitmqctl} add_vhost '${cfg.rabbitmq.vhost}'
        fi
        existing="$(${rabbitmqctl} list_users --quiet --no-table-headers | cut -f1)"
        ${lib.concatMapStrings (who: let
          user = users.${who};
        in ''
          if printf '%s\n' "$existing" | grep -qxF '${user}'; then
            printf '%s\n' "$(cat "$CREDENTIALS_DIRECTORY/amqp-${who}")" | ${rabbitmqctl} change_password '${user}'
          else
            printf '%s\n' "$(cat "$CREDENTIALS_DIRECTORY/amqp-${who}")" | ${rabbitmqctl} add_user '${user}'
          fi
          ${rabbitmqctl} set_user_tags '${user}'
          ${rabbitmqctl} set_permissions -p '${cfg.rabbitmq.vhost}' '${user}' '${permission}' '${permission}' '${permission}'
        '') ["app" "worker"]}
        if printf '%s\n' "$existing" | grep -qxF guest; then
          ${rabbitmqctl} delete_user guest
        fi
      '';
    };
  };
}
