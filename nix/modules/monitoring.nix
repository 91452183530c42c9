# Monitoring end to end on a one-host deployment: Prometheus scrapes the app and the worker
# (prometheus.nix), PostgreSQL (postgres exporter), RabbitMQ (its rabbitmq_prometheus plugin),
# nginx (nginx exporter on a loopback-only stub_status, and the access log through the
# nginxlog exporter for the statuses nginx answered, upstream errors included), evaluates
# ops/prometheus/alerts.yml, and Grafana shows ops/grafana/pageviews.json with the local
# Prometheus as its datasource. Everything listens on loopback; Grafana's admin password and
# secret key are files on the host, generated at first boot unless given.
#
# As in prometheus.nix, options of other modules are set only where they are declared, so a
# partial evaluation of NixOS (the nixos-eval harness) reports the assertion instead of
# failing on an undeclared option.
{
  config,
  options,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  mcfg = cfg.monitoring;
  common = import ./common.nix {inherit lib cfg;};
  inherit (lib) mkOption types;

  declared = {
    prometheus = options.services ? prometheus;
    exporters = options.services ? prometheus && options.services.prometheus ? exporters;
    grafana = options.services ? grafana;
  };
  oneHost = common.localApp && common.localData && common.localProxy && !common.clustered;

  # Loopback ports; nixpkgs' defaults for the exporters, RabbitMQ's for its plugin.
  ports = {
    prometheus = 9090;
    postgres = 9187;
    rabbitmq = 15692;
    nginx = 9113;
    nginxlog = 9117;
    nginxStatus = 8081;
    grafana = 3000;
  };
  local = port: "127.0.0.1:${toString port}";
  jobs = {
    postgres = ports.postgres;
    rabbitmq = ports.rabbitmq;
    nginx = ports.nginx;
    nginxlog = ports.nginxlog;
  };

  accessLog = "/var/log/nginx/pageviews.access.log";
  # The nginxlog exporter's `format` is nginx's log_format text: the one of http.conf (the
  # JSON access log), so the two cannot drift apart.
  logFormat = let
    lines = lib.splitString "\n" (builtins.readFile ../nginx/http.conf);
    from = lib.findFirst (i: lib.hasPrefix "log_format pageviews_json" (lib.elemAt lines i)) null (lib.range 0 (lib.length lines - 1));
    rest = lib.drop (from + 1) lines;
    upTo = lib.findFirst (i: lib.hasSuffix ";" (lib.elemAt rest i)) null (lib.range 0 (lib.length rest - 1));
    quoted = line: let
      m = builtins.match "[[:space:]]*'(.*)';?" line;
    in
      if m == null
      then throw "monitoring.nix: unexpected log_format line in nix/nginx/http.conf: ${line}"
      else lib.head m;
  in
    if from == null || upTo == null
    then throw "monitoring.nix: no `log_format pageviews_json` in nix/nginx/http.conf"
    else lib.concatMapStrings quoted (lib.take (upTo + 1) rest);

  secretsDir = "/var/lib/pageviews-monitoring";
  adminPasswordFile =
    if mcfg.grafana.adminPasswordFile != null
    then mcfg.grafana.adminPasswordFile
    else "${secretsDir}/grafana-admin-password";
  secretKeyFile =
    if mcfg.grafana.secretKeyFile != null
    then mcfg.grafana.secretKeyFile
    else "${secretsDir}/grafana-secret-key";
  generated =
    lib.optional (mcfg.grafana.adminPasswordFile == null) adminPasswordFile
    ++ lib.optional (mcfg.grafana.secretKeyFile == null) secretKeyFile;

  dashboards = pkgs.writeTextDir "pageviews.json" (builtins.readFile ../../ops/grafana/pageviews.json);
  datasourceUid = "pageviews-prometheus";
in {
  options.services.pageviews.monitoring = {
    enable = lib.mkEnableOption ''
      monitoring on this (one-host) deployment: Prometheus with the alert rules of
      ops/prometheus/alerts.yml scraping the app, the worker, PostgreSQL (postgres exporter),
      RabbitMQ (rabbitmq_prometheus plugin) and nginx (nginx and nginxlog exporters), and
      Grafana with that Prometheus as datasource and the pageviews dashboard, all on loopback
      (reach Grafana through an SSH tunnel to 127.0.0.1:${toString ports.grafana})
    '';
    grafana = {
      adminPasswordFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/secrets/grafana-admin-password";
        description = ''
          File with the password of Grafana's `admin` user, read by Grafana (user grafana) at
          start. Give it as a string: a Nix path literal would copy it into the store. null:
          generated at first boot in ${secretsDir}/grafana-admin-password (root:grafana 0640).
        '';
      };
      secretKeyFile = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = ''
          File with Grafana's secret key (signing, encrypted datasource secrets), as
          adminPasswordFile. null: generated at first boot in ${secretsDir}/grafana-secret-key.
        '';
      };
    };
  };

  config = lib.mkIf (cfg.enable && mcfg.enable) (lib.mkMerge [
    {
      assertions = [
        {
          assertion = oneHost;
          message = ''
            services.pageviews.monitoring runs Prometheus, Grafana and the exporters on loopback,
            so it needs every role on this host (roles = proxy, app, data; no RabbitMQ cluster);
            this host has ${lib.concatStringsSep ", " cfg.roles}.
          '';
        }
        {
          assertion = declared.prometheus && declared.exporters && declared.grafana;
          message = "services.pageviews.monitoring needs the NixOS modules of services.prometheus, services.prometheus.exporters and services.grafana.";
        }
      ];
      services.pageviews.prometheus.enable = true;

      # RabbitMQ's own exporter, aggregated metrics (no per-queue series) on loopback.
      services.rabbitmq.plugins = ["rabbitmq_prometheus"];
      services.rabbitmq.configItems = {
        "prometheus.tcp.ip" = "127.0.0.1";
        "prometheus.tcp.port" = toString ports.rabbitmq;
      };

      # stub_status for the nginx exporter, on a loopback-only listener of its own (the
      # public server blocks stay as they are).
      services.nginx.virtualHosts.pageviews-nginx-status = {
        serverName = "127.0.0.1";
        listen = [
          {
            addr = "127.0.0.1";
            port = ports.nginxStatus;
          }
        ];
        # In extraConfig like the public vhosts' locations (server.conf), not `locations`.
        extraConfig = ''
          access_log off;
          location = /nginx_status {
            stub_status;
            allow 127.0.0.1;
            deny all;
          }
          location / {
            return 404;
          }
        '';
      };

      # The postgres exporter connects over the socket as its own system user (peer), a
      # login role without privileges: what the alert rules read (pg_up, pg_stat_database,
      # pg_settings, the replication functions) needs none.
      services.postgresql.ensureUsers = [
        {
          name = "postgres-exporter";
          ensureClauses.login = true;
        }
      ];

      # Grafana's admin password and secret key, made once, never in the store.
      systemd.services.pageviews-grafana-secrets = lib.mkIf (generated != []) {
        description = "pageviews: generate Grafana's admin password and secret key";
        requiredBy = ["grafana.service"];
        before = ["grafana.service"];
        restartIfChanged = false;
        path = [pkgs.coreutils];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          UMask = "0077";
          StateDirectory = "pageviews-monitoring";
          StateDirectoryMode = "0750";
        };
        script =
          lib.concatMapStrings (file: ''
            if [ ! -s ${file} ]; then
              head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > ${file}.tmp
              chgrp grafana ${file}.tmp
              chmod 0640 ${file}.tmp
              mv ${file}.tmp ${file}
            fi
          '')
          generated
          + ''
            chgrp grafana ${secretsDir}
          '';
      };
    }

    (lib.optionalAttrs declared.prometheus {
      services.prometheus = {
        enable = true;
        listenAddress = "127.0.0.1";
        port = ports.prometheus;
        scrapeConfigs =
          lib.mapAttrsToList (job: port: {
            job_name = job;
            static_configs = [{targets = [(local port)];}];
          })
          jobs;
      };
    })

    (lib.optionalAttrs declared.exporters {
      services.prometheus.exporters = {
        postgres = {
          enable = true;
          listenAddress = "127.0.0.1";
          port = ports.postgres;
          dataSourceName = "user=postgres-exporter database=postgres host=/run/postgresql sslmode=disable";
        };
        nginx = {
          enable = true;
          listenAddress = "127.0.0.1";
          port = ports.nginx;
          scrapeUri = "http://${local ports.nginxStatus}/nginx_status";
        };
        nginxlog = {
          enable = true;
          listenAddress = "127.0.0.1";
          port = ports.nginxlog;
          settings.namespaces = [
            {
              name = "nginxlog";
              format = logFormat;
              source.files = [accessLog];
            }
          ];
        };
      };
      # The access log is nginx's (LogsDirectory, group nginx); the exporter reads it.
      systemd.services.prometheus-nginxlog-exporter = {
        after = ["nginx.service"];
        wants = ["nginx.service"];
        serviceConfig.SupplementaryGroups = ["nginx"];
      };
      systemd.services.prometheus-postgres-exporter = {
        after = ["postgresql.service"];
        wants = ["postgresql.service"];
      };
    })

    (lib.optionalAttrs declared.grafana {
      services.grafana = {
        enable = true;
        settings = {
          server = {
            http_addr = "127.0.0.1";
            http_port = ports.grafana;
          };
          security = {
            admin_user = "admin";
            admin_password = "$__file{${adminPasswordFile}}";
            secret_key = "$__file{${secretKeyFile}}";
          };
          analytics.reporting_enabled = false;
          users.allow_sign_up = false;
        };
        provision = {
          enable = true;
          datasources.settings = {
            apiVersion = 1;
            datasources = [
              {
                name = "Prometheus";
                type = "prometheus";
                uid = datasourceUid;
                url = "http://${local ports.prometheus}";
                isDefault = true;
              }
            ];
          };
          dashboards.settings = {
            apiVersion = 1;
            providers = [
              {
                name = "pageviews";
                options.path = dashboards;
              }
            ];
          };
        };
      };
    })
  ]);
}
