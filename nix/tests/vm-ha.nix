# The data tier that survives a host: `client` (the internet), `proxy` (nginx), `app` (app,
# worker), `db1..3` (PostgreSQL under Patroni with an etcd member each, synchronous
# replication), `broker` (one RabbitMQ node) and `backup` (the pgBackRest repository, SFTP),
# all on one VLAN: only the firewall keeps the others away from PostgreSQL, Patroni and etcd.
{
  pkgs,
  module,
  ...
} @ args: let
  shared = import ./nodes.nix args;
  inherit (shared) ip;
  databases = ["db1" "db2" "db3"];

  # Test-only secrets in the store, like secrets.nix (never do that with a real one): Patroni's
  # passwords, the SSH key of the repository account and the repository host's own key.
  patroniPasswords = lib.genAttrs ["superuser" "replication" "rewind"] (who: "${pkgs.writeText "pageviews-vm-test-patroni-${who}" "vmtest-patroni-${who}-0123456789"}");
  inherit (pkgs) lib;
  keys =
    pkgs.runCommand "pageviews-vm-test-ssh-keys" {
      nativeBuildInputs = [pkgs.openssh];
    } ''
      mkdir -p "$out"
      # PEM, as pgBackRest's SFTP client (libssh2) reads it.
      ssh-keygen -q -t rsa -b 3072 -m PEM -N "" -C pgbackrest -f "$out/client"
      ssh-keygen -q -t ed25519 -N "" -C backup -f "$out/host"
    '';

  # A pageviews host of this deployment with `roles`; they all agree on where the others are.
  pageviews = shared.member ({nodes, ...}: {
    imports = [
      (shared.behindProxy ["app"])
      # One broker: a cluster of one node (no host has the `data` role here).
      (shared.brokerCluster ["broker"])
    ];
    services.pageviews.database = {
      ha = {
        enable = true;
        nodes =
          map (name: {
            hostName = name;
            address = ip nodes name;
          })
          databases;
        passwordFiles = patroniPasswords;
      };
      pgbackrest = {
        enable = true;
        repository = {
          host = ip nodes "backup";
          hostKeyFile = "${keys}/host.pub";
          privateKeyFile = "${keys}/client";
        };
        # The script starts the backups; the timers stay out of its way.
        schedule.full = "3000-01-01";
        schedule.diff = "3000-01-01";
      };
    };
  });

  # `pageviews-sql 'SELECT …'` on a database host: psql as the superuser over the local
  # socket (the primary, or a replica read-only), unaligned tuples only.
  sql = {config, ...}: {
    environment.systemPackages = [
      (pkgs.writeShellScriptBin "pageviews-sql" ''
        exec ${pkgs.util-linux}/bin/runuser -u patroni -- \
          ${config.services.patroni.postgresqlPackage}/bin/psql -X -q -t -A -h /run/patroni \
          -p ${toString config.services.pageviews.database.port} -U postgres \
          -v ON_ERROR_STOP=1 -d ${config.services.pageviews.database.name} -c "$1"
      '')
    ];
  };

  database = {
    imports = [(pageviews ["database"]) sql (shared.sized 1024)];
  };

  # What the script needs to know of the Nix side, from the nodes themselves.
  constants = nodes: let
    db = nodes.db1.services;
  in
    shared.constantsOf {
      app = nodes.app;
      data = nodes.db1;
    }
    // {
      REST_PORT = db.pageviews.database.ha.restApiPort;
      ETCD_CLIENT_PORT = db.pageviews.database.ha.etcd.clientPort;
      ETCD_PEER_PORT = db.pageviews.database.ha.etcd.peerPort;
      STANZA = db.pageviews.database.ha.scope;
      PG_DATA = db.patroni.postgresqlDataDir;
      # Patroni's leader key lives `ttl` seconds, renewed every `loop_wait`: the longest a
      # crashed primary keeps the lock.
      LEADER_TTL = db.patroni.settings.bootstrap.dcs.ttl;
      LOOP_WAIT = db.patroni.settings.bootstrap.dcs.loop_wait;
      REPO_PATH = nodes.backup.services.pageviews.database.pgbackrest.repository.path;
    };
in {
  name = "pageviews-vm-ha";

  nodes = {
    client = shared.client "proxy";

    proxy = {
      imports = [(pageviews ["proxy"]) shared.certificate];
    };

    app = {
      imports = [(pageviews ["app"]) (shared.sized 1024)];
    };

    broker = {
      imports = [(pageviews ["broker"]) (shared.sized 1024)];
    };

    db1 = database;
    db2 = database;
    db3 = database;

    backup = {nodes, ...}: {
      imports = [module shared.tools];
      services.pageviews.database.pgbackrest.repository.serve = true;
      # Only the host key the database hosts know.
      services.openssh.hostKeys = [
        {
          type = "ed25519";
          path = "/etc/ssh/ssh_host_ed25519_key";
        }
      ];
      # The built keys, installed at boot (authorizedKeyFiles would read the key at evaluation
      # time, an import from a derivation).
      systemd.services.vm-test-ssh-keys = {
        wantedBy = ["sshd.service"];
        before = ["sshd.service"];
        serviceConfig.Type = "oneshot";
        script = let
          inherit (nodes.backup.services.pageviews.database.pgbackrest) repository;
        in ''
          install -d -m 0755 /etc/ssh
          install -m 0600 ${keys}/host /etc/ssh/ssh_host_ed25519_key
          install -m 0644 ${keys}/host.pub /etc/ssh/ssh_host_ed25519_key.pub
          install -d -m 0700 -o ${repository.user} -g ${repository.user} ${repository.path} ${repository.path}/.ssh
          install -m 0600 -o ${repository.user} -g ${repository.user} ${keys}/client.pub ${repository.path}/.ssh/authorized_keys
        '';
      };
    };
  };

  testScript = shared.script ./vm-ha.py constants;
}
