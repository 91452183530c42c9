# Monitoring: adds to services.prometheus (enable it on this host) scrape jobs for the app and
# the worker of this host and the alert rules of ops/prometheus/alerts.yml, whose expressions
# use these job names. ops/grafana/pageviews.json is the matching dashboard.
#
# services.prometheus is set only where it is declared: every NixOS system declares it, and
# an evaluation of a subset of NixOS's modules (lib.evalModules with only what this module
# needs, as the nixos-eval harness does) then still evaluates instead of failing on an
# undeclared option, which the module system reports even for a definition under a false mkIf.
{
  config,
  options,
  lib,
  ...
}: let
  cfg = config.services.pageviews;
  common = import ./common.nix {inherit lib cfg;};
  targets = {
    pageviews-app = cfg.settings.PAGEVIEWS_APP_METRICS_LISTEN;
    pageviews-worker = cfg.settings.PAGEVIEWS_METRICS_LISTEN;
  };
  hasPrometheus = options.services ? prometheus;
in {
  options.services.pageviews.prometheus.enable = lib.mkEnableOption ''
    the app's and the worker's scrape jobs and alert rules in services.prometheus, which must
    run on this host (the app then also listens on PAGEVIEWS_APP_METRICS_LISTEN,
    127.0.0.1:9102 by default, since its own socket is for nginx only)
  '';

  config = lib.mkIf (cfg.enable && cfg.prometheus.enable && common.localApp) (lib.mkMerge [
    {
      services.pageviews.settings.PAGEVIEWS_APP_METRICS_LISTEN = lib.mkDefault "127.0.0.1:9102";

      assertions =
        [
          {
            assertion = hasPrometheus && config.services.prometheus.enable;
            message = "services.pageviews.prometheus.enable needs services.prometheus.enable on this host.";
          }
        ]
        ++ lib.mapAttrsToList (job: target: {
          assertion = target != null && !(lib.hasPrefix "/" target);
          message = "services.pageviews.prometheus: the ${job} metrics listener must be HOST:PORT for Prometheus to scrape it (got ${toString target}).";
        })
        targets;
    }
    (lib.optionalAttrs hasPrometheus {
      services.prometheus = {
        scrapeConfigs =
          lib.mapAttrsToList (job: target: {
            job_name = job;
            static_configs = [{targets = [target];}];
          })
          targets;
        ruleFiles = [../../ops/prometheus/alerts.yml];
      };
    })
  ]);
}
