# The flake the deployer of vm-deploy runs `deploy` on (the pattern of deploy-rs' own VM
# tests): its inputs are the store paths of the outer flake's (vm-deploy.nix writes them in
# place of the line below), and its one node is vm-deploy's app host as the test framework
# builds it (nixos-test-base.nix, the test network of network.json, the nodes' addresses of
# generation.json) plus the change of the new generation.
{
  inputs = {
    ##inputs##
  };

  outputs = {
    self,
    nixpkgs,
    crane,
    deploy-rs,
    pageviews,
    ...
  }: let
    system = "x86_64-linux";
    pkgs = nixpkgs.legacyPackages.${system};
    inherit (nixpkgs) lib;
    root = /. + pageviews.outPath;
    build = import (root + "/nix/package.nix") {
      inherit lib root;
      craneLib = crane.mkLib pkgs;
    };
    module = {
      imports = [(root + "/nix/modules/default.nix")];
      services.pageviews.package = lib.mkDefault build.package;
    };
    test = import (root + "/nix/tests/vm-deploy.nix") {
      inherit pkgs module;
      tls = import (root + "/nix/tests/tls.nix") {inherit pkgs;};
      secrets = import (root + "/nix/tests/secrets.nix") {inherit pkgs;};
    };
    generation = lib.importJSON ./generation.json;
  in {
    nixosConfigurations.app = lib.nixosSystem {
      inherit system pkgs;
      modules = [
        test.nodes.app
        (pkgs.path + "/nixos/lib/testing/nixos-test-base.nix")
        # A switch would drop the test network's settings otherwise.
        (lib.importJSON ./network.json)
        {
          _module.args.nodes = generation.nodes;
          networking.hostName = "app";
          services.pageviews.settings = generation.settings;
        }
      ];
    };

    deploy.nodes.app = {
      hostname = "app";
      sshUser = "root";
      user = "root";
      sshOpts = ["-o" "StrictHostKeyChecking=no" "-o" "UserKnownHostsFile=/dev/null"];
      magicRollback = true;
      profiles.system.path = deploy-rs.lib.${system}.activate.nixos self.nixosConfigurations.app;
    };
  };
}
