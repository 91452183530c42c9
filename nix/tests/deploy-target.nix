# What makes the app host of vm-deploy a deploy-rs target, in its VM configuration and in
# every generation the deployer activates on it (deploy-flake.nix imports this file too):
# root over SSH with the NixOS tests' snake-oil key, a writable store, switch-to-configuration
# (the test profile leaves it out), no substituters (the VMs are offline).
{
  lib,
  pkgs,
  ...
}: {
  services.openssh.enable = true;
  users.users.root.openssh.authorizedKeys.keys = [(import "${pkgs.path}/nixos/tests/ssh-keys.nix" pkgs).snakeOilPublicKey];
  virtualisation.writableStore = true;
  system.switch.enable = true;
  nix.settings = {
    experimental-features = ["nix-command" "flakes"];
    trusted-users = ["root"];
    substituters = lib.mkForce [];
  };
}
