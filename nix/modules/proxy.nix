# The proxy host: nginx through services.nginx, configured by the shared snippets in
# nix/nginx/ (the same files the local launcher and the integration tests use).
{
  config,
  lib,
  pkgs,
  ...
}: let
  cfg = config.services.pageviews;
  ncfg = cfg.nginx;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) splitApp;

  hostPort = address:
    if common.isIPv6 address
    then "[${address}]:${toString cfg.network.appPort}"
    else "${address}:${toString cfg.network.appPort}";
  # Passive failover over every app host; the same parameters as the local launcher
  # (tools/testbed/src/nginx.rs UPSTREAM_PARAMETERS), the retry policy is in server.conf.
  upstreamServers = lib.concatMapStringsSep "\n    " (a: "server ${a} max_fails=1 fail_timeout=10s;") (
    if splitApp
    then map hostPort common.appAddresses
    else ["unix:${common.appSocket}"]
  );

  tlsDir = "/var/lib/pageviews-tls";
  tlsFile = "tls-${cfg.tls.profile}.conf";

  # Snippets with their @placeholders@ filled in. replaceVars fails the build if a
  # placeholder is left over or a replacement matches nothing.
  snippets = ../nginx;
  tlsConf = pkgs.replaceVars (snippets + "/${tlsFile}") {ecdh_curve = cfg.tls.ecdhCurve;};
  # server.conf includes headers.conf (and nothing else) from @conf_dir@.
  confDir = pkgs.runCommand "pageviews-nginx-conf" {} ''
    mkdir -p "$out"
    cp ${snippets + "/headers.conf"} "$out/headers.conf"
    cp ${tlsConf} "$out/${tlsFile}"
  '';
  httpConf = pkgs.replaceVars (snippets + "/http.conf") {
    upstream_servers = upstreamServers;
    rate = ncfg.rateLimit;
    access_log = "/var/log/nginx/pageviews.access.log";
    # Under the nginx unit's CacheDirectory (/var/cache/nginx); nginx creates the last level.
    cache_dir = "/var/cache/nginx/pageviews";
  };
  # The default server's body (`return 444`), the same file local.conf includes.
  catchAllConf = snippets + "/catch-all.conf";
  # The certificate both virtual hosts present (the catch-all too: TLS without SNI works and
  # the request is then routed by Host, as with local.conf).
  certificate = {
    sslCertificate =
      if cfg.tls.selfSigned
      then "${tlsDir}/cert.pem"
      else lib.mkIf (cfg.tls.certificateFile != null) cfg.tls.certificateFile;
    sslCertificateKey =
      if cfg.tls.selfSigned
      then "${tlsDir}/key.pem"
      else lib.mkIf (cfg.tls.keyFile != null) cfg.tls.keyFile;
  };
  serverConf = pkgs.replaceVars (snippets + "/server.conf") {
    conf_dir = "${confDir}";
    burst = toString ncfg.burst;
    conn_limit = toString ncfg.connectionLimit;
    static_root = "${cfg.package}/share/pageviews/static";
  };
in {
  options.services.pageviews = {
    tls.ecdhCurve = lib.mkOption {
      type = lib.types.str;
      default = "X25519:prime256v1:secp384r1";
      description = "ssl_ecdh_curve for the TLS snippets (key exchange groups, preference order).";
    };
    nginx = {
      rateLimit = lib.mkOption {
        type = lib.types.str;
        default = "10r/s";
        description = "Requests per second per client address (limit_req_zone rate).";
      };
      burst = lib.mkOption {
        type = lib.types.ints.positive;
        default = 20;
        description = "limit_req burst (requests above the rate answered at once, then 429).";
      };
      connectionLimit = lib.mkOption {
        type = lib.types.ints.positive;
        default = 20;
        description = "Concurrent connections per client address (limit_conn).";
      };
    };
  };

  config = lib.mkIf (cfg.enable && common.localProxy) {
    services.nginx = {
      enable = true;
      # The TLS, proxy and header settings come from the snippets (server level), so the
      # module's recommended* variants stay off to avoid duplicate or competing lines.
      recommendedOptimisation = true;
      recommendedTlsSettings = false;
      recommendedProxySettings = false;
      serverTokens = false;
      clientMaxBodySize = "16k";
      commonHttpConfig = ''
        include ${httpConf};
      '';
      virtualHosts.${cfg.domain} =
        certificate
        // {
          forceSSL = true;
          # 308 (not the module's default 301): the redirect keeps the method and body, as
          # the local launcher's nginx.conf does; the VM tests check it.
          redirectCode = 308;
          enableACME = cfg.tls.acme;
          # No `locations`: server.conf defines them all.
          extraConfig = ''
            include ${tlsConf};
            include ${serverConf};
          '';
        };
      # The default server on 80 and 443, as in local.conf: a Host that is not ours gets
      # no answer (444), over HTTP and HTTPS alike.
      virtualHosts.pageviews-catch-all =
        certificate
        // {
          serverName = "_";
          default = true;
          addSSL = true;
          useACMEHost = lib.mkIf cfg.tls.acme cfg.domain;
          extraConfig = ''
            include ${tlsConf};
            include ${catchAllConf};
          '';
        };
    };

    # A changed nginx configuration is reloaded (the nixpkgs module's nginx-config-reload unit:
    # `nginx -t`, then SIGHUP), not restarted: connections in progress are kept.
    services.nginx.enableReload = lib.mkDefault true;

    # nginx reaches the app's Unix socket through the app's group (socket 0660, dir 0750).
    # On the unit, not in users.users.nginx.extraGroups: a reload keeps the workers' groups of
    # their start, whereas a change of the unit restarts nginx with the new ones.
    systemd.services.nginx.serviceConfig.SupplementaryGroups = lib.mkIf (!splitApp) [common.users.app];

    # Self-signed certificate made on the host at first boot (never in the store).
    systemd.services.pageviews-selfsigned-cert = lib.mkIf cfg.tls.selfSigned {
      description = "pageviews: self-signed TLS certificate for ${cfg.domain}";
      requiredBy = ["nginx.service"];
      before = ["nginx.service"];
      # It only makes a certificate once; run again on a deploy (a new openssl), it would be
      # stopped first, and nginx, which requires it, with it.
      restartIfChanged = false;
      path = [pkgs.openssl pkgs.coreutils];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        UMask = "0027";
      };
      script = ''
        set -eu
        install -d -m 0750 -o root -g ${config.services.nginx.group} ${tlsDir}
        if [ ! -s ${tlsDir}/cert.pem ] || [ ! -s ${tlsDir}/key.pem ]; then
          openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -days 825 -subj "/CN=${cfg.domain}" \
            -addext "subjectAltName=DNS:${cfg.domain},DNS:localhost,IP:127.0.0.1" \
            -keyout ${tlsDir}/key.pem.tmp -out ${tlsDir}/cert.pem.tmp
          chgrp ${config.services.nginx.group} ${tlsDir}/key.pem.tmp ${tlsDir}/cert.pem.tmp
          chmod 0640 ${tlsDir}/key.pem.tmp
          chmod 0644 ${tlsDir}/cert.pem.tmp
          mv ${tlsDir}/key.pem.tmp ${tlsDir}/key.pem
          mv ${tlsDir}/cert.pem.tmp ${tlsDir}/cert.pem
        fi
      '';
    };
  };
}
