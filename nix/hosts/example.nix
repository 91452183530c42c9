# An example host running the whole stack on one machine. `nixos-rebuild build --flake
# .#example` builds it; `nix run .#vm` boots its VM variant in QEMU with HTTPS on
# https://localhost:8443 (self-signed certificate generated inside the VM at first boot).
# For a real host replace the file systems/boot loader below with the machine's own and
# choose tls.acme or tls.certificateFile/keyFile.
{lib, ...}: {
  networking.hostName = "pageviews-example";

  services.pageviews = {
    enable = true;
    domain = "localhost";
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
          host.port = 8443;
          guest.port = 443;
        }
        {
          from = "host";
          host.address = "127.0.0.1";
          host.port = 8080;
          guest.port = 80;
        }
      ];
    };
    # Console login for poking around the throwaway VM (journalctl -u pageviews-app).
    services.getty.autologinUser = "root";
  };
}
