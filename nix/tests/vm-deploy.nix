# A rollout with deploy-rs under load, the way deploy-rs' own VM tests run one: vm-split's
# client, proxy, app and data hosts plus a `deployer`, which holds the derivations of the app
# host's system (so it evaluates and builds offline) and a flake (deploy-flake.nix) whose
# inputs are this flake's store paths. While the client loads pages, the deployer runs
# `deploy` to roll a new generation (a changed app setting) to the app host over SSH, with
# magic rollback; every request succeeds and the app host runs the new generation.
{
  pkgs,
  # The flake's inputs (self, nixpkgs, crane, deploy-rs); read by the deployer node only.
  inputs ? throw "nix/tests: vm-deploy needs the flake's inputs (flake.nix passes them)",
  ...
} @ args: let
  inherit (pkgs) lib;
  shared = import ./nodes.nix args;
  deployRs = inputs.deploy-rs;

  # vm-split's hosts.
  pageviews = shared.split;

  # Every derivation of a system, so the deployer can evaluate and build it offline (deploy-rs'
  # tests: allDrvOutputs).
  allDrvOutputs = drv:
    pkgs.runCommand "all-drv-outputs" {refs = pkgs.writeClosure drv.drvPath;} ''
      touch $out
      while read ref; do
        case $ref in
          *.drv) cat $ref >>$out ;;
        esac
      done <$refs
    '';

  # The new generation: what deploy-flake.nix adds to the app host's configuration.
  change = {RUST_LOG = "info,pageviews=debug";};

  flakeInputs = ''
    nixpkgs.url = "${pkgs.path}";
    crane.url = "${inputs.crane}";
    deploy-rs.url = "${deployRs}";
    deploy-rs.inputs.nixpkgs.follows = "nixpkgs";
    deploy-rs.inputs.utils.url = "${deployRs.inputs.utils}";
    deploy-rs.inputs.utils.inputs.systems.url = "${deployRs.inputs.utils.inputs.systems}";
    deploy-rs.inputs.flake-compat.url = "${deployRs.inputs.flake-compat}";
    deploy-rs.inputs.flake-compat.flake = false;
    pageviews.url = "${inputs.self}";
    pageviews.flake = false;
  '';
  flake = builtins.toFile "flake.nix" (lib.replaceStrings ["##inputs##"] [flakeInputs] (builtins.readFile ./deploy-flake.nix));

  constants = nodes:
    shared.constantsOf {app = nodes.app;}
    // {
      CHANGE = change;
      DEPLOY_FILES = {
        "flake.nix" = "${flake}";
        "network.json" = "${pkgs.writeText "network.json" (builtins.toJSON nodes.app.system.build.networkConfig)}";
        "generation.json" = "${pkgs.writeText "generation.json" (builtins.toJSON {
          nodes = lib.mapAttrs (_: n: {networking.primaryIPAddress = n.networking.primaryIPAddress;}) nodes;
          settings = change;
        })}";
      };
      SSH_KEY = "${(import "${pkgs.path}/nixos/tests/ssh-keys.nix" pkgs).snakeOilPrivateKey}";
    };
in {
  name = "pageviews-vm-deploy";

  nodes = {
    client = shared.client "proxy";

    proxy = {
      imports = [(pageviews ["proxy"]) shared.certificate];
    };

    # The deploy target (deploy-flake.nix builds its new generation from this definition).
    app = {
      imports = [(pageviews ["app"]) (shared.sized 1536) ./deploy-target.nix];
    };

    data = {
      imports = [(pageviews ["data"]) shared.sql (shared.sized 2048)];
    };

    deployer = {nodes, ...}: {
      environment.systemPackages = [deployRs.packages.${pkgs.stdenv.hostPlatform.system}.default];
      nix.settings = {
        experimental-features = ["nix-command" "flakes"];
        substituters = lib.mkForce [];
      };
      # Evaluating the app host's system takes memory.
      virtualisation.memorySize = 4096;
      virtualisation.writableStore = true;
      virtualisation.additionalPaths = [(allDrvOutputs nodes.app.system.build.toplevel)];
    };
  };

  testScript = shared.script ./vm-deploy.py constants;
}
