# The crane build of the workspace: dependencies once (cargoArtifacts), then what ships:
# `package` is the service crate only (pageviews-app, pageviews-worker and the static files
# nginx serves); `probe` is pageviews-probe, for the VM tests. The launcher
# (pageviews-stack) and the benchmark are tools for a checkout, not packaged.
{
  lib,
  craneLib,
  root,
}: let
  inherit (lib) fileset;

  # Two sources, each holding only what its builds read, so that editing anything else
  # rebuilds nothing:
  # - `src`, the package's: the workspace's manifests and Rust sources (cargo loads every
  #   member to build one), what the service crate reads at compile time (askama templates,
  #   diesel migrations) and the static files installed beside it. cleanCargoSource would
  #   drop the latter; the root's tests/ (the integration tests), tools/nixfmt-check (a
  #   crate of its own for scripts/check-nix) and deny.toml (checks.deny's) are cut out.
  # - `testSrc`, for clippy --all-targets, rustfmt and the tests: `src` plus the integration
  #   tests, the setup SQL and script of src/ (the NixOS module runs them, the tests too), the
  #   nginx snippets the testbed embeds and the ops files the tests check.
  # nix/package-src-check.nix says what may be in each; `nix flake check` and scripts/check-nix
  # fail on anything else, and .ci/run runs the builds and the tests in exactly these files
  # (scripts/nix-source materialises them).
  srcFileset = fileset.unions [
    (fileset.difference (craneLib.fileset.commonCargoSources root) (fileset.unions [
      (fileset.maybeMissing (root + "/tools/nixfmt-check"))
      (fileset.maybeMissing (root + "/tests"))
      (fileset.maybeMissing (root + "/deny.toml"))
    ]))
    (root + "/migrations")
    (root + "/templates")
    (root + "/static")
  ];
  testSrcFileset = fileset.unions [
    srcFileset
    # The database and broker setup the NixOS module runs; the tests run the same files.
    (fileset.fileFilter (f: f.hasExt "sql" || f.hasExt "sh") (root + "/src"))
    (root + "/tests")
    (root + "/nix/nginx")
    (root + "/ops")
    # The settings' defaults as the NixOS module and README state them: a test compares them
    # with the binaries' (tests/integration/config_errors.rs).
    (root + "/nix/modules/settings-defaults.json")
    (root + "/README.md")
  ];
  src = fileset.toSource {
    inherit root;
    fileset = srcFileset;
  };
  testSrc = fileset.toSource {
    inherit root;
    fileset = testSrcFileset;
  };

  crateName = craneLib.crateNameFromCargoToml {cargoToml = root + "/Cargo.toml";};

  commonArgs = {
    inherit src;
    inherit (crateName) pname version;
    strictDeps = true;
    # Pure Rust (rustls/ring, a Rust PostgreSQL driver): no C libraries to link.
    buildInputs = [];
    nativeBuildInputs = [];
  };

  # Compiled once, shared by the package, clippy and the tests.
  cargoArtifacts = craneLib.buildDepsOnly commonArgs;

  package = craneLib.buildPackage (commonArgs
    // {
      inherit cargoArtifacts;
      cargoExtraArgs = "--locked --package pageviews";
      # The tests need PostgreSQL, RabbitMQ and nginx: they run in checks.tests.
      doCheck = false;
      postInstall = ''
        mkdir -p "$out/share/pageviews"
        cp -r static "$out/share/pageviews/static"
      '';
      meta = {
        description = "Records page views over HTTP and processes them asynchronously";
        license = lib.licenses.mit;
        mainProgram = "pageviews-app";
        platforms = lib.platforms.linux;
      };
    });

  probe = craneLib.buildPackage (commonArgs
    // {
      inherit cargoArtifacts;
      pname = "pageviews-probe";
      cargoExtraArgs = "--locked --package pageviews-probe";
      doCheck = false;
      meta = {
        description = "Checks a deployed pageviews stack from outside";
        license = lib.licenses.mit;
        mainProgram = "pageviews-probe";
        platforms = lib.platforms.linux;
      };
    });
in {
  inherit srcFileset testSrcFileset src testSrc commonArgs cargoArtifacts package probe;
}
