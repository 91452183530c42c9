{
  description = "pageviews: axum app + RabbitMQ worker + PostgreSQL behind hardened nginx";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    # crane has no inputs of its own: nothing to `follows`.
    crane.url = "github:ipetkov/crane/v0.24.0";
    # The RustSec advisory database for checks.audit, at the rev flake.lock holds (no flake).
    advisory-db = {
      url = "github:rustsec/advisory-db";
      flake = false;
    };
    # Multi-host rollout (`deploy`, nix/deploy.nix): activate.nixos, deployChecks.
    deploy-rs = {
      url = "github:serokell/deploy-rs";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  # advisory-db is read only by checks.audit and deploy-rs only by `deploy` and
  # checks.deploy-schema, so the other outputs evaluate without them.
  outputs = inputs @ {
    self,
    nixpkgs,
    crane,
    ...
  }: let
    inherit (nixpkgs) lib;
    systems = ["x86_64-linux" "aarch64-linux"];
    forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

    perSystem = forAllSystems (system: pkgs: let
      craneLib = crane.mkLib pkgs;
      build = import ./nix/package.nix {
        inherit lib craneLib;
        inherit (pkgs) writeTextDir;
        root = ./.;
      };
      images = import ./nix/images.nix {
        inherit pkgs;
        inherit (build) package;
      };
      # CycloneDX JSON of the service crate's dependencies (packages.<system>.sbom)
      sbom = import ./nix/sbom.nix {inherit pkgs craneLib build;};
      checks =
        import ./nix/checks.nix {
          inherit pkgs craneLib build sbom;
          inherit (inputs) advisory-db;
          root = ./.;
        }
        # NixOS VM tests: vm-split, vm-single, vm-images, vm-cluster (need a builder with KVM).
        // import ./nix/tests {
          inherit pkgs images;
          inherit (build) probe;
          inherit inputs;
          module = self.nixosModules.default;
        };
    in {
      inherit build images sbom craneLib;
      # deploy-rs' schema check of `deploy` (its deploy-activate check would build every host).
      checks =
        checks
        // lib.optionalAttrs (system == "x86_64-linux") {
          deploy-schema = (inputs.deploy-rs.lib.${system}.deployChecks self.deploy).deploy-schema;
        };
      example = mkExample system;
    });

    # The example hosts of the split and cluster topologies (nix/hosts/fleet.nix).
    fleet = import ./nix/hosts/fleet.nix {inherit lib;};

    # The example host on a given platform (its VM variant backs `nix run .#vm`).
    mkExample = system:
      lib.nixosSystem {
        modules = [
          self.nixosModules.default
          ./nix/hosts/example.nix
          {nixpkgs.hostPlatform = system;}
        ];
      };
  in {
    packages = lib.mapAttrs (_: s:
      {
        default = s.build.package;
        pageviews = s.build.package;
        pageviews-probe = s.build.probe;
        inherit (s) sbom;
      }
      // s.images.packages)
    perSystem;

    checks = lib.mapAttrs (_: s: s.checks) perSystem;

    formatter = forAllSystems (_: pkgs: pkgs.alejandra);

    devShells = forAllSystems (system: pkgs: {
      default = perSystem.${system}.craneLib.devShell {
        checks = {inherit (perSystem.${system}.checks) clippy tests;};
        packages = [
          pkgs.alejandra
          pkgs.deadnix
          pkgs.postgresql
          pkgs.rabbitmq-server
          pkgs.nginx
          pkgs.openssl
          pkgs.curl
        ];
        shellHook = ''
          export PATH="${pkgs.rabbitmq-server}/sbin:$PATH"
        '';
      };
    });

    apps =
      lib.mapAttrs (_: s: {
        vm = {
          type = "app";
          program = lib.getExe s.example.config.system.build.vm;
          meta.description = "Boot the whole stack in QEMU; HTTPS on https://localhost:8443, http://localhost:8080 redirects there";
        };
      })
      perSystem;

    # `pkgs.pageviews`, built with the nixpkgs it is applied to: the default of
    # services.pageviews.package when nix/modules/default.nix is imported on its own.
    overlays.default = final: _prev: {
      pageviews =
        (import ./nix/package.nix {
          inherit (final) lib writeTextDir;
          craneLib = crane.mkLib final;
          root = ./.;
        })
        .package;
    };

    # services.pageviews, with `package` defaulting to this flake's build for the host. It
    # sets the package instead of applying overlays.default: runNixOSTest (and any host that
    # passes its own pkgs) makes nixpkgs.* read-only.
    nixosModules.default = {pkgs, ...}: {
      imports = [./nix/modules/default.nix];
      services.pageviews.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
    };

    nixosConfigurations =
      {example = perSystem.x86_64-linux.example;}
      // lib.mapAttrs (_: h:
        lib.nixosSystem {
          modules = [self.nixosModules.default h.module {nixpkgs.hostPlatform = "x86_64-linux";}];
        })
      fleet;

    # `deploy .#split-app` etc. (deploy-rs): every host of nix/hosts/fleet.nix.
    deploy = import ./nix/deploy.nix {
      inherit lib;
      hosts = fleet;
      inherit (self) nixosConfigurations;
      activateNixos = inputs.deploy-rs.lib.x86_64-linux.activate.nixos;
    };
  };
}
