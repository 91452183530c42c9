# Scenarios for services.pageviews.monitoring (nix/modules/monitoring.nix), merged into
# scenarios.nix's `checks`. They load, besides the harness's modules, the real NixOS modules
# of services.prometheus, services.prometheus.exporters (with its postgres, nginx and
# nginxlog exporters) and services.grafana, transcribed into the harness's cache next to the
# prometheus module prometheusJobs uses. Each check is skipped (with the reason) while one of
# those files is missing.
{
  lib,
  pkgs,
  paths,
  eval,
  module,
  withPackage,
  check,
  skipped,
  failedAssertions,
  root,
  testArgs,
}: let
  nixos = p: paths.cache + "/nixpkgs/nixos/modules/${p}";
  files = {
    prometheus = nixos "services/monitoring/prometheus/default.nix";
    exporters = nixos "services/monitoring/prometheus/exporters.nix";
    postgres = nixos "services/monitoring/prometheus/exporters/postgres.nix";
    nginx = nixos "services/monitoring/prometheus/exporters/nginx.nix";
    nginxlog = nixos "services/monitoring/prometheus/exporters/nginxlog.nix";
    assertions = nixos "misc/assertions.nix";
    grafana = nixos "services/monitoring/grafana.nix";
  };
  missing = lib.filter (f: !builtins.pathExists f) (lib.attrValues files);
  whenCached = c:
    if missing != []
    then skipped "not in the cache: ${toString missing}"
    else c;

  # exporters.nix imports the file of every exporter nixpkgs has (about 90) to declare its
  # options; the cache holds the three this project uses. The others are read as exporters
  # with nixpkgs' common options only (port 1, disabled), plus the one option exporters.nix's
  # own assertions read of one of them (mysqld.runAsLocalSuperUser). The file itself is
  # evaluated as it is, only its `import` goes through this shim.
  absentExporter = path: _: {
    port = 1;
    serviceOpts = {};
    extraOpts = lib.optionalAttrs (baseNameOf path == "mysqld.nix") {
      runAsLocalSuperUser = lib.mkOption {
        type = lib.types.bool;
        default = false;
      };
    };
  };
  exportersModule = lib.setDefaultModuleLocation files.exporters (builtins.scopedImport {
      import = path:
        if builtins.pathExists path
        then builtins.import path
        else absentExporter path;
    }
    files.exporters);

  # Options outside the harness that exporters.nix sets under conditions false here
  # (typed as in nixpkgs; a definition under a false mkIf still needs its option declared).
  exporterNeeds = {
    options = {
      services.postfix.enable = lib.mkOption {
        type = lib.types.bool;
        default = false;
      };
      services.postfix.setgidGroup = lib.mkOption {
        type = lib.types.str;
        default = "postdrop";
      };
      hardware.rtl-sdr.enable = lib.mkOption {
        type = lib.types.bool;
        default = false;
      };
      system.activationScripts = lib.mkOption {
        type = lib.types.attrsOf lib.types.unspecified;
        default = {};
      };
      services.udev.extraRules = lib.mkOption {
        type = lib.types.lines;
        default = "";
      };
    };
    # nixos/modules/misc/ids.nix
    config.ids.uids.grafana = 196;
  };

  # What these modules take from pkgs beyond the harness's stub pkgs: named fake packages, and
  # pkgs.formats.{yaml,ini} whose `generate` writes the real file (YAML as JSON, which YAML
  # reads; INI with the mkKeyValue/listToValue grafana.nix passes).
  fake = name: {
    type = "derivation";
    inherit name;
    pname = name;
    version = "0";
    outPath = "${paths.fakestore}/${name}";
    meta = {};
  };
  jsonValue = with lib.types;
    nullOr (oneOf [bool int float str path (attrsOf jsonValue) (listOf jsonValue)])
    // {description = "JSON value";};
  iniAtom = with lib.types; nullOr (oneOf [bool int float str]);
  monitoringPkgs = {
    _module.args.pkgs = lib.mkForce (pkgs
      // lib.genAttrs ["prometheus" "prometheus-postgres-exporter" "prometheus-nginx-exporter" "prometheus-nginxlog-exporter" "grafana" "acl"] fake
      // {
        linkFarm = name: _: fake name;
        xorg.lndir = fake "lndir";
        formats = {
          yaml = _: {
            type = jsonValue;
            generate = name: value: pkgs.writeText name (builtins.toJSON value);
          };
          ini = {
            listToValue ? null,
            mkKeyValue ? lib.generators.mkKeyValueDefault {} "=",
            ...
          }: {
            type = with lib.types; attrsOf (attrsOf (either iniAtom (listOf iniAtom)));
            generate = name: value:
              pkgs.writeText name (lib.generators.toINI {
                  mkKeyValue = k: v:
                    mkKeyValue k (
                      if lib.isList v && listToValue != null
                      then listToValue v
                      else v
                    );
                }
                value);
          };
        };
      });
  };
  monitoringModules = [files.prometheus exportersModule files.grafana exporterNeeds monitoringPkgs];

  oneHost = extra:
    eval ([
        module
        withPackage
        {
          services.pageviews = {
            enable = true;
            tls.selfSigned = true;
            monitoring.enable = true;
          };
        }
      ]
      ++ extra);
  has = lib.hasInfix;
  httpConf = builtins.readFile (root + "/nix/nginx/http.conf");
  dashboardJson = builtins.readFile (root + "/ops/grafana/pageviews.json");
in {
  # For scenarios.nix's `reports` (nginx -t on the generated nginx.conf).
  evals.monitoringOneHost = oneHost monitoringModules;

  checks = {
    # One host with monitoring: the six scrape jobs on loopback, the exporters and the plugin
    # on loopback, stub_status on a loopback-only listener, the nginxlog exporter reading the
    # access log with http.conf's own log_format, Grafana on loopback with the datasource and
    # the dashboard provisioned and its secrets as $__file references (no warning from
    # grafana.nix's own check), the alert rules loaded.
    monitoringOneHost = whenCached (let
      ev = oneHost monitoringModules;
      c = ev.config;
      p = c.services.prometheus;
      jobs = lib.listToAttrs (map (j: lib.nameValuePair j.job_name (lib.concatMap (s: s.targets) j.static_configs)) p.scrapeConfigs);
      unit = n: c.systemd.services.${n};
      execStart = n: toString (unit n).serviceConfig.ExecStart;
      nginxlogConfig = let
        m = builtins.match ".*-config-file ([^ \n]+).*" (execStart "prometheus-nginxlog-exporter");
      in
        builtins.fromJSON (builtins.readFile (lib.head m));
      g = c.services.grafana;
      grafanaIni = builtins.readFile (lib.head (builtins.match ".*-config ([^ \n]+).*" (unit "grafana").script));
      provider = lib.head g.provision.dashboards.settings.providers;
      datasource = lib.head g.provision.datasources.settings.datasources;
      nginxConf = builtins.readFile c.environment.etc."nginx/nginx.conf".source;
      ns = lib.head nginxlogConfig.namespaces;
      results = {
        assertions = failedAssertions ev == [];
        warnings = c.warnings == [];
        jobs =
          jobs
          == {
            nginx = ["127.0.0.1:9113"];
            nginxlog = ["127.0.0.1:9117"];
            pageviews-app = ["127.0.0.1:9102"];
            pageviews-worker = ["127.0.0.1:9101"];
            postgres = ["127.0.0.1:9187"];
            rabbitmq = ["127.0.0.1:15692"];
          };
        rules = p.ruleFiles == [(root + "/ops/prometheus/alerts.yml")];
        prometheusLoopback = p.listenAddress == "127.0.0.1";
        postgresExporter = has "--web.listen-address 127.0.0.1:9187" (execStart "prometheus-postgres-exporter") && has "user=postgres-exporter " (unit "prometheus-postgres-exporter").environment.DATA_SOURCE_NAME;
        exporterRole = lib.any (u: u.name == "postgres-exporter") c.services.postgresql.ensureUsers;
        nginxExporter = has "--nginx.scrape-uri='http://127.0.0.1:8081/nginx_status'" (execStart "prometheus-nginx-exporter") && has "--web.listen-address=127.0.0.1:9113" (execStart "prometheus-nginx-exporter");
        stubStatusLoopback = has "listen 127.0.0.1:8081" nginxConf && has "stub_status;" nginxConf && !(has "listen 0.0.0.0:8081" nginxConf);
        nginxlog = nginxlogConfig.listen.address == "127.0.0.1" && ns.source.files == ["/var/log/nginx/pageviews.access.log"] && has (lib.replaceStrings ["$"] [""] ns.format) (lib.replaceStrings ["'" "\n" " " "$"] ["" "" "" ""] httpConf);
        rabbitmqPlugin = lib.elem "rabbitmq_prometheus" c.services.rabbitmq.plugins && c.services.rabbitmq.configItems."prometheus.tcp.ip" == "127.0.0.1";
        grafanaLoopback = g.settings.server.http_addr == "127.0.0.1" && has "http_addr=127.0.0.1" grafanaIni;
        grafanaSecrets = has "admin_password=$__file{/var/lib/pageviews-monitoring/grafana-admin-password}" grafanaIni && has "secret_key=$__file{/var/lib/pageviews-monitoring/grafana-secret-key}" grafanaIni && lib.elem "grafana.service" (unit "pageviews-grafana-secrets").requiredBy;
        datasource = datasource.type == "prometheus" && datasource.url == "http://127.0.0.1:9090" && datasource.uid == "pageviews-prometheus";
        dashboard = provider.options.path.text == dashboardJson;
      };
    in
      check (lib.all lib.id (lib.attrValues results)) {
        inherit results jobs;
        failedAssertions = failedAssertions ev;
        inherit (c) warnings;
        nginxlogFormat = ns.format;
      });

    # A split host: the assertion, not a half-monitored deployment.
    monitoringNeedsOneHost = whenCached (let
      fa = failedAssertions (eval ([
          module
          withPackage
          {
            services.pageviews = {
              enable = true;
              roles = ["proxy"];
              network.appAddress = "192.168.1.2";
              tls.selfSigned = true;
              monitoring.enable = true;
            };
          }
        ]
        ++ monitoringModules));
    in
      check (lib.any (has "needs every role on this host") fa) {failedAssertions = fa;});

    # vm-monitoring's node as the test framework evaluates it (with these modules), and its
    # testScript applied to it: the constants the Python gets are read from real options.
    vmMonitoring = whenCached (let
      test = import (root + "/nix/tests/vm-monitoring.nix") testArgs;
      ev = eval ([
          test.nodes.server
          {
            networking.hostName = "server";
            networking.primaryIPAddress = "192.168.1.1";
            _module.args.nodes = lib.mkForce nodes;
          }
        ]
        ++ monitoringModules);
      nodes.server = ev.config;
      script = test.testScript {inherit nodes;};
      commonPy = builtins.readFile (root + "/nix/tests/common.py");
      constants = lib.head (lib.splitString commonPy script);
    in
      check (failedAssertions ev
        == []
        && has commonPy script
        && has ''GRAFANA_PASSWORD_FILE = "/var/lib/pageviews-monitoring/grafana-admin-password"'' constants
        && has ''"pageviews-infrastructure"'' constants
        && has ''NGINX_STATUS = "127.0.0.1:8081"'' constants) {
        inherit (test) name;
        failedAssertions = failedAssertions ev;
        inherit constants;
      });

    # Without the monitoring modules declared (the harness's own set): the assertion, not an
    # evaluation error.
    monitoringUndeclared = let
      fa = failedAssertions (oneHost []);
    in
      check (lib.any (has "needs the NixOS modules of services.prometheus") fa) {failedAssertions = fa;};
  };
}
