# The data tier that survives a host: hosts with the `database` role form a Patroni cluster
# (nixpkgs services.patroni) over an etcd cluster on the same hosts (services.etcd; not
# Patroni's built-in Raft, which upstream deprecated). Commits wait for one synchronous standby
# (Patroni's synchronous_mode), so a page view answered 200 is on two hosts; Patroni promotes a
# standby when the primary is gone and rejoins the old primary as a standby (pg_rewind).
# The app and the worker get every node in DATABASE_URL with target_session_attrs=read-write
# (common.nix): the client tries them in turn and keeps the primary, so nothing sits between
# them and PostgreSQL. Passwords reach Patroni and PostgreSQL only through systemd credentials.
# Backups (pgBackRest) are in ./pgbackrest.nix, the firewall rules in ./firewall.nix.
#
# services.patroni and services.etcd are set only where they are declared, as backup.nix does
# with services.postgresqlBackup: every NixOS system declares them, an evaluation of a subset
# of NixOS's modules (the nixos-eval harness) may not.
{
  config,
  options,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  ha = cfg.database.ha;
  inherit (lib) mkOption types;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) users localDatabase;
  hostName = config.networking.hostName;
  self = lib.findFirst (n: n.hostName == hostName) null ha.nodes;
  peers = lib.filter (n: n.hostName != hostName) ha.nodes;
  declared = options.services ? patroni && options.services ? etcd;

  # The superuser Patroni creates and connects as; the OS user `patroni` (which runs
  # PostgreSQL) and `pgbackrest` reach it over the Unix socket through the ident map below.
  superuser = "postgres";
  socketDir = "/run/patroni";
  credentials = unit: "/run/credentials/${unit}.service";
  psql = "${config.services.patroni.postgresqlPackage}/bin/psql";
  restApi = "http://${common.urlHost self.address}:${toString ha.restApiPort}";
  etcdScheme =
    if ha.etcd.tls == null
    then "http"
    else "https";
  etcdUrl = address: port: "${etcdScheme}://${common.urlHost address}:${toString port}";
  # The client certificate Patroni shows etcd, and etcd's own (client and peer) certificate.
  etcdCredentials = lib.optionals (ha.etcd.tls != null) [
    "etcd-ca:${ha.etcd.tls.caFile}"
    "etcd-cert:${ha.etcd.tls.certFile}"
    "etcd-key:${ha.etcd.tls.keyFile}"
  ];
  hostLines = who: addrs: method: map (a: "host ${who} ${common.hostCidr a} ${method}") addrs;
  nodeAddresses = map (n: n.address) ha.nodes;
in {
  options.services.pageviews.database = {
    host = mkOption {
      type = types.nullOr types.str;
      default = cfg.network.dataAddress;
      defaultText = lib.literalExpression "network.dataAddress";
      example = "10.0.0.5";
      description = ''
        Address (or name) of the PostgreSQL server the app and the worker connect to over TCP
        when it is not on their host, like Mastodon's `database.host`. Defaults to the data
        host. Unused with `database.ha.enable`: then DATABASE_URL lists every node of
        `database.ha.nodes`.
      '';
    };

    ha = {
      enable = lib.mkEnableOption ''
        PostgreSQL on three or more hosts with the `database` role: Patroni with etcd,
        synchronous replication and automatic failover. The app and the worker reach the
        primary through a multi-host DATABASE_URL (`target_session_attrs=read-write`).
        Set the same `ha` options on every host of the deployment'';

      nodes = mkOption {
        type = types.listOf (types.submodule {
          options = {
            hostName = mkOption {
              type = types.str;
              example = "db1";
              description = "The database host's `networking.hostName` (its Patroni member and etcd member name).";
            };
            address = mkOption {
              type = types.str;
              example = "10.0.0.21";
              description = "The database host's private IPv4 address (PostgreSQL, Patroni's REST API, etcd).";
            };
          };
        });
        default = [];
        description = ''
          The nodes of the cluster, the same list on every host: each runs PostgreSQL under
          Patroni and an etcd member. Three tolerate the loss of one (etcd keeps its quorum,
          a synchronous standby takes over). Boot them together: etcd forms its cluster from
          this list at the first start.
        '';
      };

      scope = mkOption {
        type = types.str;
        default = "pageviews";
        description = "Patroni's cluster name (`scope`), also the pgBackRest stanza.";
      };

      postgresqlPackage = lib.mkPackageOption pkgs "postgresql_17" {
        extraDescription = ''
          The data directory is /var/lib/postgresql/<major version>: a new major version
          starts an empty cluster, so pin it and upgrade deliberately (pg_upgrade on every
          node, or a new cluster restored from a dump).
        '';
      };

      restApiPort = mkOption {
        type = types.port;
        default = 8008;
        description = "Port of Patroni's REST API (open to the other nodes only).";
      };

      synchronousStrict = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Patroni's `synchronous_mode_strict`. Commits always wait for a synchronous standby
          while one is there (`synchronous_mode`). When the last standby is gone too, false
          (the default) lets the primary accept writes alone: the service stays up, and a
          commit made then is on one host until a standby is back. true holds every commit
          until a standby is back instead: the app answers 500 ("may have been stored") after
          PAGEVIEWS_DB_TIMEOUT_MS, and no page view answered 200 is ever on one host only.
          README "Scaling out" has the measured behaviour of both.
        '';
      };

      connectTimeout = mkOption {
        type = types.ints.between 1 60;
        default = 2;
        description = ''
          Seconds the app and the worker wait for each node when connecting
          (`connect_timeout` in DATABASE_URL): a node that is down without refusing
          connections is passed over after this long.
        '';
      };

      passwordFiles = lib.genAttrs ["superuser" "replication" "rewind"] (role:
        mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/run/secrets/patroni-${role}";
          description = ''
            File with the password of Patroni's ${role} role, the same file on every database
            host; handed to Patroni as a systemd credential (never in the store). A path as a
            string: a Nix path literal would copy it into the store.
          '';
        });

      etcd = {
        clientPort = mkOption {
          type = types.port;
          default = 2379;
          description = "etcd's client port (Patroni; open to the other nodes only).";
        };
        peerPort = mkOption {
          type = types.port;
          default = 2380;
          description = "etcd's peer port (open to the other nodes only).";
        };
        tls = mkOption {
          type = types.nullOr (types.submodule {
            options = lib.genAttrs ["caFile" "certFile" "keyFile"] (what:
              mkOption {
                type = types.str;
                description = "PEM ${what} on each database host (a path as a string; handed to etcd and Patroni as a credential).";
              });
          });
          default = null;
          description = ''
            TLS with client certificates between the etcd members and from Patroni to etcd:
            a CA and, on each host, a certificate for its address signed by it. null: plain
            HTTP, which the firewall limits to the database hosts.
          '';
        };
      };
    };
  };

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      assertions = [
        {
          assertion = localDatabase -> ha.enable;
          message = "services.pageviews: the `database` role is a node of database.ha: set database.ha.enable and database.ha.nodes.";
        }
        {
          assertion = ha.enable -> lib.length ha.nodes >= 3;
          message = "services.pageviews.database.ha: needs at least three nodes (etcd's quorum and a synchronous standby survive the loss of one); it lists ${toString (lib.length ha.nodes)}.";
        }
        {
          assertion = ha.enable -> lib.allUnique (map (n: n.hostName) ha.nodes) && lib.allUnique nodeAddresses;
          message = "services.pageviews.database.ha.nodes: every node needs its own hostName and address.";
        }
        {
          assertion = ha.enable -> !common.localData;
          message = ''
            services.pageviews: with database.ha.enable PostgreSQL runs on the `database` hosts;
            this host also has the `data` role, whose single PostgreSQL would be a second,
            unreplicated database. Drop `data` (the app and data on one host cannot use the
            cluster either), and run RabbitMQ on `broker` hosts (rabbitmq.cluster.nodes, one or three).
          '';
        }
        {
          assertion = ha.enable -> common.clustered;
          message = "services.pageviews.database.ha: no host has the `data` role, so RabbitMQ runs on `broker` hosts: set rabbitmq.cluster.nodes (one node is a single broker).";
        }
        {
          assertion = localDatabase -> self != null;
          message = "services.pageviews: this `database` host (networking.hostName \"${hostName}\") is not in database.ha.nodes.";
        }
        {
          assertion = localDatabase -> lib.all (f: f != null) (lib.attrValues ha.passwordFiles ++ lib.attrValues cfg.database.passwordFiles);
          message = "services.pageviews: a `database` host needs every database.ha.passwordFiles.* (superuser, replication, rewind) and database.passwordFiles.* (owner, app, worker).";
        }
        {
          assertion = localDatabase -> lib.all (a: !common.isIPv6 a) nodeAddresses;
          message = "services.pageviews.database.ha.nodes: IPv4 addresses only (Patroni's nodeIp becomes HOST:PORT unbracketed).";
        }
        {
          assertion = localDatabase -> declared;
          message = "services.pageviews: a `database` host needs NixOS's services.patroni and services.etcd modules.";
        }
      ];
    }

    (lib.mkIf (localDatabase && self != null) (lib.optionalAttrs declared {
      services.etcd = {
        enable = true;
        name = hostName;
        # Loopback too, for etcdctl on the host.
        listenClientUrls = [(etcdUrl self.address ha.etcd.clientPort) (etcdUrl "127.0.0.1" ha.etcd.clientPort)];
        advertiseClientUrls = [(etcdUrl self.address ha.etcd.clientPort)];
        listenPeerUrls = [(etcdUrl self.address ha.etcd.peerPort)];
        initialAdvertisePeerUrls = [(etcdUrl self.address ha.etcd.peerPort)];
        initialCluster = map (n: "${n.hostName}=${etcdUrl n.address ha.etcd.peerPort}") ha.nodes;
        initialClusterToken = ha.scope;
        # The files are the credentials of etcd.service (strings: never copied to the store).
        clientCertAuth = ha.etcd.tls != null;
        peerClientCertAuth = ha.etcd.tls != null;
        trustedCaFile = lib.mkIf (ha.etcd.tls != null) "${credentials "etcd"}/etcd-ca";
        certFile = lib.mkIf (ha.etcd.tls != null) "${credentials "etcd"}/etcd-cert";
        keyFile = lib.mkIf (ha.etcd.tls != null) "${credentials "etcd"}/etcd-key";
      };
      systemd.services.etcd.serviceConfig.LoadCredential = etcdCredentials;

      services.patroni = {
        enable = true;
        postgresqlPackage = ha.postgresqlPackage;
        inherit (ha) scope restApiPort;
        name = hostName;
        nodeIp = self.address;
        otherNodesIps = map (n: n.address) peers;
        postgresqlPort = cfg.database.port;
        environmentFiles = {
          PATRONI_SUPERUSER_PASSWORD = "${credentials "patroni"}/superuser";
          PATRONI_REPLICATION_PASSWORD = "${credentials "patroni"}/replication";
          PATRONI_REWIND_PASSWORD = "${credentials "patroni"}/rewind";
        };
        settings = {
          etcd3 =
            {
              hosts = map (n: "${n.address}:${toString ha.etcd.clientPort}") ha.nodes;
            }
            // lib.optionalAttrs (ha.etcd.tls != null) {
              protocol = "https";
              cacert = "${credentials "patroni"}/etcd-ca";
              cert = "${credentials "patroni"}/etcd-cert";
              key = "${credentials "patroni"}/etcd-key";
            };
          bootstrap = {
            # The cluster-wide settings, written to etcd when the cluster is first made (change
            # them later with `patronictl edit-config`).
            dcs = {
              ttl = 30;
              loop_wait = 10;
              retry_timeout = 10;
              maximum_lag_on_failover = 1048576;
              synchronous_mode = true;
              synchronous_mode_strict = ha.synchronousStrict;
              postgresql = {
                use_pg_rewind = true;
                use_slots = true;
                parameters = {
                  wal_level = "replica";
                  wal_log_hints = "on";
                  hot_standby = "on";
                };
              };
            };
            # Group access: pgBackRest (another user) reads the data directory.
            initdb = [{encoding = "UTF8";} "data-checksums" "allow-group-access"];
          };
          postgresql = {
            use_unix_socket = true;
            authentication = {
              superuser.username = superuser;
              replication.username = "replicator";
              rewind.username = "rewind";
            };
            parameters = {
              unix_socket_directories = socketDir;
              password_encryption = "scram-sha-256";
            };
            pg_ident = [
              "pageviews patroni ${superuser}"
              "pageviews pgbackrest ${superuser}"
            ];
            # The nodes replicate and rewind; the app hosts reach only the pageviews database,
            # as its three roles, with SCRAM.
            pg_hba =
              ["local all ${superuser} peer map=pageviews"]
              ++ hostLines "replication replicator" nodeAddresses "scram-sha-256"
              ++ hostLines "all rewind" nodeAddresses "scram-sha-256"
              ++ lib.concatMap (role: hostLines "${cfg.database.name} ${role}" cfg.network.dataClients "scram-sha-256") (lib.attrValues users);
          };
        };
      };

      systemd.tmpfiles.rules = ["d ${socketDir} 0750 patroni patroni -"];

      systemd.services.patroni = {
        wants = ["etcd.service"];
        after = ["etcd.service"];
        serviceConfig = {
          LoadCredential = map (who: "${who}:${ha.passwordFiles.${who}}") ["superuser" "replication" "rewind"] ++ etcdCredentials;
          RestartSec = "5s";
        };
        # Restarted however often it fails (etcd not up yet at the first boot).
        unitConfig.StartLimitIntervalSec = 0;
      };

      # The database, its roles, their grants and passwords (src/db/roles.sql, then setup.sql,
      # the file the single-host setup runs), applied on the leader once per boot of each node:
      # a replica has them through replication. Passwords reach the server as SCRAM verifiers,
      # as in data.nix.
      systemd.services.pageviews-db-setup = {
        description = "pageviews: database, roles and grants on the Patroni leader";
        wantedBy = ["multi-user.target"];
        wants = ["patroni.service"];
        after = ["patroni.service"];
        path = [pkgs.coreutils pkgs.curl pkgs.util-linux];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          LoadCredential = lib.mapAttrsToList (who: file: "db-${who}:${file}") cfg.database.passwordFiles;
          UMask = "0077";
          TimeoutStartSec = "15min";
        };
        script = ''
          set -eu
          # Leader (GET /primary: 200) or running replica (GET /replica: 200), polled until
          # Patroni has decided; the unit's TimeoutStartSec bounds it.
          until curl -sf -o /dev/null --max-time 2 ${restApi}/primary; do
            if curl -sf -o /dev/null --max-time 2 ${restApi}/replica; then
              echo "a replica: the leader sets up the database"
              exit 0
            fi
            sleep 2
          done
          ${lib.concatMapStrings (who: let
            var = "PAGEVIEWS_${lib.toUpper who}_VERIFIER";
          in ''
            ${var}="$(${cfg.package}/bin/pageviews-app scram-verifier < "$CREDENTIALS_DIRECTORY/db-${who}")"
            export ${var}
          '') (lib.attrNames users)}
          as_superuser() {
            runuser -u patroni -- ${psql} -X -q -h ${socketDir} -p ${toString cfg.database.port} -U ${superuser} "$@"
          }
          vars=(${lib.escapeShellArgs (lib.mapAttrsToList (name: value: "--variable=${name}=${value}") ({db = cfg.database.name;} // users))})
          as_superuser -d postgres "''${vars[@]}" -f ${../../src/db/roles.sql}
          as_superuser -d ${lib.escapeShellArg cfg.database.name} "''${vars[@]}" --variable=passwords=1 -f ${../../src/db/setup.sql}
        '';
      };

      # patronictl and psql for operators: `patronictl list`, `psql -h ${socketDir} -U postgres`.
      environment.systemPackages = [config.services.patroni.postgresqlPackage];
    }))
  ]);
}
