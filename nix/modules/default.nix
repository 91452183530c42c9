# services.pageviews: the app, the worker and the migration step, plus the PostgreSQL,
# RabbitMQ, nginx and firewall they need, on one host (default) or split across a proxy,
# an app and a data host (set `roles` and `network.*` on each host).
#
# Every option path used here is listed, with the nixpkgs file that declares it, in
# nix/OPTIONS.md.
{
  config,
  options,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  inherit (lib) mkOption types;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) splitApp splitData localApp localData localProxy secretsDir appSocket;
  # The binaries' defaults, as `pageviews-app check-config --defaults-json` prints them (a
  # cargo test, tests/integration/config_errors.rs, fails when this file, the options below
  # or README's table differ from them).
  binaryDefaults = lib.importJSON ./settings-defaults.json;
in {
  imports = [
    ./units.nix
    ./data.nix
    ./proxy.nix
    ./firewall.nix
    ./prometheus.nix
    ./monitoring.nix
    ./cluster.nix
    ./backup.nix
    ./database-ha.nix
    ./pgbackrest.nix
  ];

  options.services.pageviews = {
    enable = lib.mkEnableOption "pageviews (page view recorder: app, worker, nginx, PostgreSQL, RabbitMQ)";

    package = lib.mkPackageOption pkgs "pageviews" {
      extraDescription = ''
        Binaries in bin/, static files in share/pageviews/static. The flake's
        `nixosModules.default` sets it to the flake's own build; when this file is imported
        directly, add the flake's `overlays.default` to `nixpkgs.overlays` (which provides
        `pkgs.pageviews`) or set this option.
      '';
    };

    roles = mkOption {
      type = types.listOf (types.enum ["proxy" "app" "data" "broker" "database"]);
      default = ["proxy" "app" "data"];
      example = ["app"];
      description = ''
        What runs on this host: `proxy` (nginx, TLS, ports 80/443), `app` (pageviews-app,
        pageviews-worker, the migration unit) and `data` (PostgreSQL, RabbitMQ). One host runs
        all three by default. To split the stack, give each host its roles and set
        `network.appAddress` / `network.dataAddress` / `network.proxyAddresses` to the
        private addresses of the others (the same values on every host). `broker`: a node
        of the RabbitMQ cluster in `rabbitmq.cluster` (the data host then runs only
        PostgreSQL). `database`: a node of the Patroni cluster in `database.ha` (PostgreSQL,
        Patroni and etcd; no host has `data` then).
      '';
    };

    domain = mkOption {
      type = types.str;
      default = "localhost";
      example = "pageviews.example.org";
      description = "Public host name nginx serves (server_name, certificate name).";
    };

    tls = {
      acme = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Obtain the certificate from an ACME CA through nginx's `enableACME` (HTTP-01 on
          port 80). Also set `security.acme.acceptTerms` and `security.acme.defaults.email`.
        '';
      };
      selfSigned = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Generate a self-signed certificate for `domain` (and localhost) at first boot under
          /var/lib/pageviews-tls (never in the Nix store). For VMs and trials.
        '';
      };
      certificateFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/secrets/pageviews/fullchain.pem";
        description = "PEM certificate chain (a path on the host as a string, not a store path).";
      };
      keyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/secrets/pageviews/key.pem";
        description = ''
          PEM private key, readable by the nginx group. Give it as a string: a Nix path
          literal would copy the key into the world-readable store.
        '';
      };
      profile = mkOption {
        type = types.enum ["modern" "intermediate"];
        default = "modern";
        description = "Mozilla TLS profile (guideline 6.0): `modern` = TLS 1.3 only (the default, as the seed chose), `intermediate` = TLS 1.2 + 1.3 for older clients.";
      };
    };

    network = {
      appAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10.0.0.2";
        description = ''
          Private address of the app host. null when the app runs on this host and nginx is
          here too (then the app listens on a Unix socket). Required on the proxy host and on
          the data host of a split deployment; on the app host it is the listen address.
        '';
      };
      appPort = mkOption {
        type = types.port;
        default = 8000;
        description = "TCP port of pageviews-app when the proxy is on another host.";
      };
      dataAddress = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10.0.0.3";
        description = ''
          Private address of the data host (PostgreSQL and RabbitMQ). null when they run on
          this host. On the data host of a split deployment PostgreSQL and RabbitMQ listen there.
        '';
      };
      proxyAddresses = mkOption {
        type = types.listOf types.str;
        default = [];
        example = ["10.0.0.1"];
        description = "Addresses allowed to reach the app port (the proxy hosts), when split.";
      };
      dataClients = mkOption {
        type = types.listOf types.str;
        default = cfg.network.appAddresses;
        defaultText = lib.literalExpression "appAddresses";
        description = "Addresses allowed to reach PostgreSQL (5432) and RabbitMQ (5672), when split.";
      };
    };

    database = {
      name = mkOption {
        type = types.str;
        default = "pageviews";
        description = "PostgreSQL database name.";
      };
      owner = mkOption {
        type = types.str;
        default = "pageviews";
        description = ''
          Role (and system user) that owns the database and its schema and runs the
          migrations. Must equal `name` (nixpkgs' ensureDBOwnership needs it).
        '';
      };
      port = mkOption {
        type = types.port;
        default = 5432;
        description = "PostgreSQL TCP port (used when split).";
      };
      passwordFiles = lib.genAttrs ["owner" "app" "worker"] (role:
        mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/run/secrets/pageviews-db-${role}";
          description = ''
            File with the PostgreSQL password of the ${role} role, needed on the app host and
            on the data host (same content) when they are different hosts. Unused on one host
            (peer authentication over the Unix socket). Trailing newlines are dropped; any
            other control character is refused. E.g. `openssl rand -hex 32`.
          '';
        });
    };

    rabbitmq = {
      vhost = mkOption {
        type = types.str;
        default = "pageviews";
        description = "RabbitMQ virtual host (URL-safe characters only).";
      };
      port = mkOption {
        type = types.port;
        default = 5672;
        description = "AMQP port.";
      };
      passwordFiles = lib.genAttrs ["app" "worker"] (who:
        mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "/run/secrets/pageviews-amqp-${who}";
          description = ''
            File with the RabbitMQ password of the ${who} user (`pageviews-${who}`). null:
            generated at first boot under ${secretsDir} (only possible when the app and
            the broker share a host). Trailing newlines are dropped; any other control
            character is refused.
          '';
        });
    };

    settings = mkOption {
      description = ''
        Environment of pageviews-app and pageviews-worker (RFC 42 style: any
        `PAGEVIEWS_*`/`RUST_LOG` variable the binaries read; null removes one).
        `DATABASE_URL` and `AMQP_URL` are built by the module from the options above, and
        the binaries read the passwords from the units' credentials (`passwordFiles`), so
        secrets never reach the store. Checked when the system is built
        (`check-config`): a bad value fails the build. Where an option's default differs
        from the binary's own (settings-defaults.json), its description says why.
      '';
      default = {};
      type = types.submodule {
        freeformType = types.attrsOf (types.nullOr (types.oneOf [types.str types.int types.bool]));
        options = {
          RUST_LOG = mkOption {
            type = types.str;
            default = binaryDefaults.RUST_LOG;
            description = "tracing filter.";
          };
          PAGEVIEWS_LOG_FORMAT = mkOption {
            type = types.enum ["text" "json" "journald"];
            default = "journald";
            description = "Log format: `journald` here, native journal fields (`journalctl -u pageviews-app F_REQUEST_ID=…`); `json` writes one JSON object per line to stderr, which journald keeps as one text field (the binaries' own default is `${binaryDefaults.PAGEVIEWS_LOG_FORMAT}`, for a terminal).";
          };
          PAGEVIEWS_RETENTION_DAYS = mkOption {
            type = types.nullOr types.ints.positive;
            default = binaryDefaults.PAGEVIEWS_RETENTION_DAYS;
            example = 90;
            description = "Workers delete processed page views older than this many days, in small batches, once per rollup interval across workers; null keeps every page view. The page's figures stay all-time (README, \"Operating it\"). The upper bound is the binaries' and is checked when the system is built (check-config).";
          };
          PAGEVIEWS_LISTEN = mkOption {
            type = types.str;
            default =
              if splitApp && cfg.network.appAddress != null
              then "${cfg.network.appAddress}:${toString cfg.network.appPort}"
              else appSocket;
            defaultText = lib.literalExpression ''"/run/pageviews-app/app.sock", or "''${appAddress}:''${appPort}" when split'';
            description = "App listen address: HOST:PORT or an absolute Unix socket path (the socket unit owns it; nginx reaches a socket on this host).";
          };
          PAGEVIEWS_METRICS_LISTEN = mkOption {
            type = types.nullOr types.str;
            default = "127.0.0.1:9101";
            description = "Worker /metrics and /healthz listen address (null: off). On by default here, for Prometheus; the binary has none unless set.";
          };
          PAGEVIEWS_APP_METRICS_LISTEN = mkOption {
            type = types.nullOr types.str;
            default = binaryDefaults.PAGEVIEWS_APP_METRICS_LISTEN;
            defaultText = lib.literalExpression ''null, or "127.0.0.1:9102" with prometheus.enable'';
            description = "A second app listener with only /metrics, /healthz and /readyz, HOST:PORT (null: off).";
          };
          PAGEVIEWS_DB_POOL_SIZE = mkOption {
            type = types.ints.positive;
            default = binaryDefaults.PAGEVIEWS_DB_POOL_SIZE;
            description = "Database connections per process.";
          };
          PAGEVIEWS_PREFETCH = mkOption {
            type = types.ints.between 1 65535;
            default = binaryDefaults.PAGEVIEWS_PREFETCH;
            description = "Worker AMQP prefetch (unacknowledged deliveries).";
          };
          PAGEVIEWS_ROLLUP_INTERVAL_SECS = mkOption {
            type = types.ints.positive;
            default = binaryDefaults.PAGEVIEWS_ROLLUP_INTERVAL_SECS;
            description = "Worker scheduled rollup interval.";
          };
          PAGEVIEWS_SWEEP_INTERVAL_SECS = mkOption {
            type = types.ints.positive;
            default = binaryDefaults.PAGEVIEWS_SWEEP_INTERVAL_SECS;
            description = "App re-publish sweep interval for unconfirmed page views.";
          };
        };
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        # mkPackageOption's default is pkgs.pageviews; without the overlay that attribute
        # is missing and nothing else defines the option (priority 1500 = the default only).
        assertion = pkgs ? pageviews || options.services.pageviews.package.highestPrio < 1500;
        message = ''
          services.pageviews.package has no value: pkgs has no `pageviews`. Import the flake's
          `nixosModules.default` (it sets the package), or add the flake's `overlays.default` to
          `nixpkgs.overlays`, or set services.pageviews.package yourself.
        '';
      }
      {
        assertion = cfg.roles != [];
        message = "services.pageviews.roles must name at least one role.";
      }
      {
        assertion = cfg.database.owner == cfg.database.name;
        message = "services.pageviews.database.owner must equal database.name (ensureDBOwnership).";
      }
      {
        assertion = lib.all (name: !(lib.hasAttr name cfg.settings)) ["DATABASE_URL" "AMQP_URL" "PAGEVIEWS_DATABASE_PASSWORD_FILE" "PAGEVIEWS_AMQP_PASSWORD_FILE"];
        message = "services.pageviews.settings: DATABASE_URL, AMQP_URL and their password files are set by the module; use the passwordFiles options.";
      }
      {
        assertion = splitData -> (localApp -> common.databaseAddresses != [] && (common.clustered || cfg.network.dataAddress != null)) && (localData -> cfg.network.dataClients != []);
        message = "services.pageviews: app and data on different hosts need network.dataAddress (app host) and network.appAddress or dataClients (data host).";
      }
      {
        assertion = splitApp -> (localApp -> cfg.network.appAddress != null && cfg.network.proxyAddresses != []) && (localProxy -> cfg.network.appAddresses != []);
        message = "services.pageviews: proxy and app on different hosts need network.appAddress and network.proxyAddresses (app host) and network.appAddress or appAddresses (proxy).";
      }
      {
        assertion = splitData -> lib.all (f: f != null) (lib.attrValues cfg.database.passwordFiles ++ lib.attrValues cfg.rabbitmq.passwordFiles);
        message = "services.pageviews: when app and data are on different hosts, set every database.passwordFiles.* and rabbitmq.passwordFiles.* (same files on both hosts).";
      }
      {
        assertion = localProxy -> (lib.length (lib.filter (x: x) [cfg.tls.acme cfg.tls.selfSigned (cfg.tls.certificateFile != null)]) == 1);
        message = "services.pageviews.tls: choose exactly one of acme, selfSigned, or certificateFile + keyFile.";
      }
      {
        assertion = (cfg.tls.certificateFile != null) == (cfg.tls.keyFile != null);
        message = "services.pageviews.tls: certificateFile and keyFile go together.";
      }
    ];

    # Generates the broker passwords left at null (one host only), root-only, once.
    systemd.services.pageviews-secrets = lib.mkIf ((localApp || localData) && common.generatedSecrets != []) {
      description = "pageviews: generate missing local secrets";
      wantedBy = ["multi-user.target"];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        UMask = "0077";
        StateDirectory = "pageviews-secrets";
        StateDirectoryMode = "0700";
      };
      path = [pkgs.coreutils];
      script =
        lib.concatMapStrings (who: ''
          if [ ! -s ${secretsDir}/amqp-${who} ]; then
            head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > ${secretsDir}/amqp-${who}.tmp
            mv ${secretsDir}/amqp-${who}.tmp ${secretsDir}/amqp-${who}
          fi
        '')
        common.generatedSecrets;
    };
  };
}
