# OCI images (Docker image archive format, loadable with `docker load` / `podman load`):
# one binary each, numeric non-root user, no shell, configuration by environment.
#
#   nix build .#app-image && docker load < result
#   docker run --rm -e DATABASE_URL=... -e AMQP_URL=... -p 8000:8000 pageviews-app:<version>
#
# `packages` are the flake's image outputs; `ports` says where each listens, as a plain
# attrset beside them (the VM test reads it): what a builder passes through on the image
# derivation differs between nixpkgs versions, so nothing relies on it. The app image
# serves /metrics and /readyz on a port of their own (`app-operations`, 9102), not on the
# page's (8000): publishing 8000 does not make them public.
{
  pkgs,
  package,
}: let
  inherit (package) version;
  inherit (pkgs) lib;

  # 65534 is "nobody" in fakeNss's /etc/passwd; numeric so no lookup is needed.
  user = "65534:65534";

  labels = component: {
    "org.opencontainers.image.title" = "pageviews-${component}";
    "org.opencontainers.image.description" = "pageviews ${component}: ${package.meta.description}";
    "org.opencontainers.image.version" = version;
    "org.opencontainers.image.licenses" = "MIT";
    "org.opencontainers.image.source" = "https://example.invalid/pageviews";
  };

  # Only the image's own binary, not the whole package (the other binary, static files):
  # the build fails if the copy still refers to the package.
  binary = component:
    pkgs.runCommand "pageviews-${component}-${version}" {disallowedReferences = [package];} ''
      install -D -m 0555 ${package}/bin/pageviews-${component} "$out/bin/pageviews-${component}"
    '';

  ports = {
    app-image = 8000;
    app-operations = 9102;
    worker-image = 9100;
  };

  # `operations`: the app's second listener (PAGEVIEWS_APP_METRICS_LISTEN), if any.
  mkImage = {
    component,
    listenVariable,
    operations ? null,
  }: let
    port = ports."${component}-image";
  in
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
        Entrypoint = ["${binary component}/bin/pageviews-${component}"];
        User = user;
        WorkingDir = "/tmp";
        Env =
          [
            "PAGEVIEWS_LOG_FORMAT=json"
            "RUST_LOG=info"
            "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
          ]
          # Inside a container it must listen on all interfaces of its network namespace.
          ++ ["${listenVariable}=0.0.0.0:${toString port}"]
          ++ lib.optional (operations != null) "${operations.variable}=0.0.0.0:${toString operations.port}";
        ExposedPorts =
          {"${toString port}/tcp" = {};}
          // lib.optionalAttrs (operations != null) {"${toString operations.port}/tcp" = {};};
        Labels = labels component;
      };
    };
in {
  inherit ports;
  packages = {
    app-image = mkImage {
      component = "app";
      listenVariable = "PAGEVIEWS_LISTEN";
      operations = {
        variable = "PAGEVIEWS_APP_METRICS_LISTEN";
        port = ports.app-operations;
      };
    };
    worker-image = mkImage {
      component = "worker";
      listenVariable = "PAGEVIEWS_METRICS_LISTEN";
    };
  };
}
