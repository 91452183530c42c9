# deploy-rs nodes (flake output `deploy`) for the example hosts of nix/hosts/fleet.nix: one
# `system` profile per host, activated with deploy-rs' `activate.nixos` (switch-to-configuration
# switch) over SSH as root. Magic rollback: after activating, deploy-rs must reach the host
# again over a new SSH connection within confirmTimeout, or the host rolls back to the
# previous generation by itself (as it does when the activation fails: autoRollback).
{
  lib,
  hosts,
  nixosConfigurations,
  # deploy-rs.lib.<system>.activate.nixos
  activateNixos,
}: {
  sshUser = "root";
  user = "root";
  magicRollback = true;
  autoRollback = true;
  # Seconds for the activation (the migrations run in it) and for the confirmation.
  activationTimeout = 600;
  confirmTimeout = 60;
  nodes =
    lib.mapAttrs (name: h: {
      hostname = h.address;
      profiles.system.path = activateNixos nixosConfigurations.${name};
    })
    hosts;
}
