# An example host running the whole stack on one machine. `nixos-rebuild build --flake
# .#example` builds it; `nix run .#vm` boots its VM variant in QEMU with HTTPS on
# https://localhost:8443 and HTTP on http://localhost:8080, which answers 308 to
# https://localhost:8443 (self-signed certificate generated inside the VM at first boot).
# For a real host replace the file systems/boot loader below with the machine's own and
# choose tls.acme or tls.certificateFile/keyFile.
{lib, ...}: let
  domain = "localhost";
  # Host ports QEMU forwards to the guest's 443 and 80 in the VM variant.
  vmPorts = {
    https = 8443;
    http = 8080;
  };
in {
  networking.hostName = "pageviews-example";

  services.pageviews = {
    enable = true;
    inherit domain;
    tls.selfSigned = true;
  };

  # Placeholders so the configuration evaluates; a real machine has its own.
  boot.loader.grub.device = lib.mkDefault "/dev/vda";
  fileSystems."/" = lib.mkDefault {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };

  system.stateVersion = "26.05";

  # `nix run .#vm` (virtualisation.vmVariant applies only to the VM build).
  virtualisation.vmVariant = {
    virtualisation = {
      memorySize = 2048;
      cores = 2;
      graphics = false;
      forwardPorts = [
        {
          from = "host";
          host.address = "127.0.0.1";
          host.port = vmPorts.https;
          guest.port = 443;
        }
        {
          from = "host";
          host.address = "127.0.0.1";
          host.port = vmPorts.http;
          guest.port = 80;
        }
      ];
    };
    # forceSSL's port-80 server redirects to https://$host$request_uri, i.e. port 443 of
    # the machine the browser runs on, which is not forwarded. In the VM the HTTPS vhost
    # serves TLS only and a plain port-80 vhost redirects to the forwarded HTTPS port.
    services.nginx.virtualHosts = {
      ${domain} = {
        forceSSL = lib.mkForce false;
        onlySSL = true;
      };
      "${domain}-http-redirect" = {
        serverName = domain;
        extraConfig = ''
          return 308 https://$host:${toString vmPorts.https}$request_uri;
        '';
      };
    };
    # Console login for poking around the throwaway VM (journalctl -u pageviews-app).
    services.getty.autologinUser = "root";
  };
}
