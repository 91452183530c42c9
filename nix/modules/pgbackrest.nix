# Physical backups and point-in-time recovery of the Patroni cluster (./database-ha.nix) with
# nixpkgs' services.pgbackrest: every database host archives WAL when it is the primary
# (archive_mode = on: a standby archives nothing) into one repository on another host, reached
# over SFTP (a repository type the nixpkgs module supports as it is), and runs the full and
# differential backups on timers, which do their work only on the current primary. Expiry
# follows the retention after each backup. Patroni rebuilds a lost replica from the
# repository (create_replica_methods), falling back to pg_basebackup while there is no backup.
# The SSH key is a file on each database host, installed where both users that need it
# (patroni for archive-push and restore, pgbackrest for the backups) can read it.
#
# The repository host (repository.serve) is a plain SFTP account with the database hosts'
# public key. services.pgbackrest and services.openssh are set only where they are declared
# (see backup.nix).
{
  config,
  options,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  ha = cfg.database.ha;
  pb = cfg.database.pgbackrest;
  repo = pb.repository;
  inherit (lib) mkOption types;
  common = import ./common.nix {inherit lib cfg;};
  pgbackrest = "${pkgs.pgbackrest}/bin/pgbackrest";
  stanza = ha.scope;
  keyDir = "/var/lib/pageviews-pgbackrest";
  keyFile = "${keyDir}/sftp-key";
  # Built from the key file, which may itself be built (a VM test's key).
  knownHosts = pkgs.runCommand "pageviews-pgbackrest-known-hosts" {} ''
    printf '%s ' ${lib.escapeShellArg repo.host} > "$out"
    cat ${repo.hostKeyFile} >> "$out"
  '';
  self = lib.findFirst (n: n.hostName == config.networking.hostName) null ha.nodes;
  primaryCheck = "${pkgs.curl}/bin/curl -sf -o /dev/null --max-time 5 http://${common.urlHost self.address}:${toString ha.restApiPort}/primary";
  member = cfg.enable && common.localDatabase && pb.enable && self != null;
  declared = options.services ? pgbackrest && options.services ? patroni;
in {
  options.services.pageviews.database.pgbackrest = {
    enable = lib.mkEnableOption ''
      pgBackRest on the hosts of database.ha: WAL archiving from the primary and full and
      differential backups on timers into `repository` (on another host, over SFTP)'';

    repository = {
      host = mkOption {
        type = types.str;
        example = "10.0.0.30";
        description = "Address of the host that stores the repository (SFTP).";
      };
      user = mkOption {
        type = types.str;
        default = "pgbackrest";
        description = "The account on the repository host.";
      };
      path = mkOption {
        type = types.str;
        default = "/var/lib/pgbackrest-repository";
        description = "The repository's directory on the repository host (that account's home).";
      };
      hostKeyFile = mkOption {
        type = types.path;
        example = lib.literalExpression ''pkgs.writeText "backup-host-key" "ssh-ed25519 AAAAC3Nza..."'';
        description = ''
          A file with the repository host's SSH public host key (one line, as in its
          /etc/ssh/ssh_host_*_key.pub; public, so a store path is fine): pgBackRest checks the
          host against it (`sftp-host-key-check-type = strict`), never trusting a first
          connection. Give the host only that key type.
        '';
      };
      privateKeyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/pgbackrest-sftp-key";
        description = ''
          On each database host: the SSH private key (PEM, no passphrase) of the repository
          account, the same on every node. A path as a string (a Nix path literal would copy it
          into the store); installed at ${keyFile} (root:pgbackrest, 0440).
        '';
      };
      serve = mkOption {
        type = types.bool;
        default = false;
        description = "This host stores the repository: OpenSSH and the `user` account with `authorizedKeyFiles` (services.pageviews.enable is not needed there).";
      };
      authorizedKeyFiles = mkOption {
        type = types.listOf types.path;
        default = [];
        description = "On the repository host: files with the public key(s) of `privateKeyFile`.";
      };
    };

    schedule = {
      full = mkOption {
        type = types.str;
        default = "Sun *-*-* 01:30:00";
        description = "When the full backup runs (systemd.time(7) calendar event).";
      };
      diff = mkOption {
        type = types.str;
        default = "Mon..Sat *-*-* 01:30:00";
        description = "When the differential backup runs (systemd.time(7) calendar event).";
      };
    };

    retention = {
      full = mkOption {
        type = types.ints.positive;
        default = 2;
        description = "Full backups kept (`repo1-retention-full`); older ones and the WAL they alone need are expired.";
      };
      diff = mkOption {
        type = types.ints.positive;
        default = 6;
        description = "Differential backups kept (`repo1-retention-diff`).";
      };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf (cfg.enable && pb.enable) {
      assertions = [
        {
          assertion = ha.enable;
          message = "services.pageviews.database.pgbackrest: needs database.ha (one host: database.backup, the daily logical backup).";
        }
        {
          assertion = common.localDatabase -> repo.privateKeyFile != null;
          message = "services.pageviews.database.pgbackrest.repository.privateKeyFile: set it on every database host.";
        }
        {
          assertion = common.localDatabase -> declared;
          message = "services.pageviews.database.pgbackrest: a database host needs NixOS's services.pgbackrest module.";
        }
      ];
    })

    (lib.mkIf member (lib.optionalAttrs declared {
      services.pgbackrest = {
        enable = true;
        repos.repo1 = {
          type = "sftp";
          inherit (repo) path;
          sftp-host = repo.host;
          sftp-host-user = repo.user;
          sftp-private-key-file = keyFile;
          sftp-host-key-check-type = "strict";
          sftp-known-host = "${knownHosts}";
          retention-full = pb.retention.full;
          retention-diff = pb.retention.diff;
          # Small files (WAL of a quiet database) stored together: fewer SFTP round trips.
          bundle = true;
        };
        stanzas.${stanza} = {
          instances.localhost = {
            path = config.services.patroni.postgresqlDataDir;
            socket-path = "/run/patroni";
            port = cfg.database.port;
            user = "postgres";
          };
          jobs = {
            full = {
              schedule = pb.schedule.full;
              type = "full";
            };
            diff = {
              schedule = pb.schedule.diff;
              type = "diff";
            };
          };
        };
        # A backup starts with an immediate checkpoint instead of waiting for the next one.
        settings.start-fast = true;
      };

      services.patroni.settings.postgresql = {
        parameters = {
          archive_mode = "on";
          archive_command = "${pgbackrest} --stanza=${stanza} archive-push %p";
        };
        # A standby fetches WAL it missed from the repository.
        recovery_conf.restore_command = "${pgbackrest} --stanza=${stanza} archive-get %f \"%p\"";
        create_replica_methods = ["pgbackrest" "basebackup"];
        pgbackrest = {
          command = "${pgbackrest} --stanza=${stanza} --delta --type=standby restore";
          keep_data = true;
          no_params = true;
        };
        basebackup = {checkpoint = "fast";};
      };

      # Each user reaches the other's files: pgbackrest the data directory and the socket,
      # patroni (archive-push) the key and pgBackRest's lock directory.
      users.users.pgbackrest.extraGroups = ["patroni"];
      users.users.patroni.extraGroups = ["pgbackrest"];

      systemd.services =
        {
          pageviews-pgbackrest-key = {
            description = "pageviews: install pgBackRest's SFTP key";
            wantedBy = ["multi-user.target"];
            before = ["patroni.service"];
            serviceConfig = {
              Type = "oneshot";
              RemainAfterExit = true;
              LoadCredential = ["sftp-key:${repo.privateKeyFile}"];
            };
            path = [pkgs.coreutils];
            script = ''
              install -d -m 0750 -o root -g pgbackrest ${keyDir}
              install -m 0440 -o root -g pgbackrest "$CREDENTIALS_DIRECTORY/sftp-key" ${keyFile}
            '';
          };
          patroni = {
            wants = ["pageviews-pgbackrest-key.service"];
            after = ["pageviews-pgbackrest-key.service"];
          };
          # The leader creates the stanza once it has set up the database (idempotent).
          pageviews-db-setup.script = lib.mkAfter ''
            runuser -u pgbackrest -- ${pgbackrest} --stanza=${stanza} stanza-create
          '';
        }
        # The timers fire on every node; only the primary backs up (a replica skips it).
        // lib.genAttrs (map (job: "pgbackrest-${stanza}-${job}") ["full" "diff"]) (_: {
          wants = ["pageviews-pgbackrest-key.service"];
          after = ["pageviews-pgbackrest-key.service"];
          serviceConfig.ExecCondition = primaryCheck;
        });
    }))

    (lib.mkIf repo.serve (lib.optionalAttrs (options.services ? openssh) {
      services.openssh.enable = true;
      users.users.${repo.user} = {
        isSystemUser = true;
        group = repo.user;
        home = repo.path;
        createHome = true;
        # sshd starts the SFTP server through the account's shell.
        useDefaultShell = true;
        openssh.authorizedKeys.keyFiles = repo.authorizedKeyFiles;
      };
      users.groups.${repo.user} = {};
    }))
  ];
}
