# OCI images (Docker image archive format, loadable with `docker load` / `podman load`):
# one binary each, numeric non-root user, no shell, configuration by environment.
#
#   nix build .#app-image && docker load < result
#   docker run --rm -e DATABASE_URL=... -e AMQP_URL=... -p 8000:8000 pageviews-app:<version>
{
  pkgs,
  package,
}: let
  inherit (package) version;

  # 65534 is "nobody" in fakeNss's /etc/passwd; numeric so no lookup is needed.
  user = "65534:65534";

  labels = component: {
    "org.opencontainers.image.title" = "pageviews-${component}";
    "org.opencontainers.image.description" = "pageviews ${component}: ${package.meta.description}";
    "org.opencontainers.image.version" = version;
    "org.opencontainers.image.licenses" = "MIT";
    "org.opencontainers.image.source" = "https://example.invalid/pageviews";
  };

  mkImage = {
    component,
    env,
    ports,
  }:
    pkgs.dockerTools.buildLayeredImage {
      name = "pageviews-${component}";
      tag = version;
      # fakeNss: /etc/passwd, /etc/group and nsswitch.conf (files first) for libc lookups.
      # caCertificates: /etc/ssl/certs/ca-certificates.crt for TLS to remote brokers/DBs.
      contents = [pkgs.dockerTools.fakeNss pkgs.dockerTools.caCertificates];
      # No /tmp in a scratch image; the binaries may need one.
      extraCommands = ''
        mkdir -m 1777 tmp
      '';
      config = {
        Entrypoint = ["${package}/bin/pageviews-${component}"];
        User = user;
        WorkingDir = "/tmp";
        Env =
          [
            "PAGEVIEWS_LOG_FORMAT=json"
            "RUST_LOG=info"
            "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
          ]
          ++ env;
        ExposedPorts = builtins.listToAttrs (map (p: {
            name = "${toString p}/tcp";
            value = {};
          })
          ports);
        Labels = labels component;
      };
    };
in {
  app-image = mkImage {
    component = "app";
    # Inside a container the app must listen on all interfaces of its network namespace.
    env = ["PAGEVIEWS_LISTEN=0.0.0.0:8000"];
    ports = [8000];
  };

  worker-image = mkImage {
    component = "worker";
    env = ["PAGEVIEWS_METRICS_LISTEN=0.0.0.0:9100"];
    ports = [9100];
  };
}
