# Monitoring end to end on one host (services.pageviews.monitoring): `server` runs the whole
# stack with Prometheus, the exporters and Grafana; the script checks that every scrape
# target is up, that every infrastructure metric the alert rules name is there, that the
# rules are loaded, and that Grafana serves the provisioned dashboard to its admin (password
# read from the file the host generated) and to nobody else.
{
  pkgs,
  module,
  tls,
  ...
} @ args: let
  shared = import ./nodes.nix args;
  inherit (pkgs) lib;
  alerts = builtins.readFile ../../ops/prometheus/alerts.yml;

  constants = nodes: let
    c = nodes.server;
    g = c.services.grafana.settings;
  in
    shared.constantsOf {app = c;}
    // {
      PROMETHEUS = "${c.services.prometheus.listenAddress}:${toString c.services.prometheus.port}";
      JOBS = map (j: j.job_name) c.services.prometheus.scrapeConfigs;
      TARGETS = lib.concatMap (j: lib.concatMap (s: s.targets) j.static_configs) c.services.prometheus.scrapeConfigs;
      NGINX_STATUS = lib.removeSuffix "/nginx_status" (lib.removePrefix "http://" c.services.prometheus.exporters.nginx.scrapeUri);
      RULE_GROUPS = map (g: lib.removePrefix "- name: " (lib.trim g)) (lib.filter (l: lib.hasPrefix "  - name: " l) (lib.splitString "\n" alerts));
      RULES = lib.length (lib.filter (l: lib.hasPrefix "- alert: " (lib.trim l)) (lib.splitString "\n" alerts));
      # (not from services.prometheus.exporters: its removed exporters throw when listed)
      EXPORTER_UNITS = map (n: "${n}.service") (lib.filter (n: lib.hasPrefix "prometheus-" n && lib.hasSuffix "-exporter" n) (lib.attrNames c.systemd.services));
      GRAFANA = "${g.server.http_addr}:${toString g.server.http_port}";
      GRAFANA_ADMIN = g.security.admin_user;
      # "$__file{/path}" -> /path
      GRAFANA_PASSWORD_FILE = lib.removeSuffix "}" (lib.removePrefix "$__file{" g.security.admin_password);
      DASHBOARD_UID = (builtins.fromJSON (builtins.readFile ../../ops/grafana/pageviews.json)).uid;
      DATASOURCE_UID = (lib.head c.services.grafana.provision.datasources.settings.datasources).uid;
    };
in {
  name = "pageviews-vm-monitoring";

  nodes.server = {
    imports = [module shared.certificate shared.tools (shared.sized 3072)];
    services.pageviews = {
      enable = true;
      inherit (tls) domain;
      monitoring.enable = true;
    };
  };

  testScript = shared.script ./vm-monitoring.py constants;
}
