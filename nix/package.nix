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

  # cleanCargoSource would drop what the crate reads at compile time (askama templates,
  # diesel migrations) and the static files we install, so list them explicitly.
  # Everything else (nix/, scripts/, docs) stays out, so editing it does not rebuild. The
  # workspace members (tools/testbed, tools/stack, bench/, probe/) must be there for cargo to
  # load the workspace; commonCargoSources would also take tools/nixfmt-check (a crate of its
  # own, used only by scripts/check-nix), so that is cut out. nix/package-src-check.nix fails
  # `nix flake check` and scripts/check-nix if a file of tools/nixfmt-check, nix/ (but
  # nix/nginx/), scripts/ or .ci/ gets back in.
  srcFileset = fileset.unions [
    (fileset.difference (craneLib.fileset.commonCargoSources root) (fileset.maybeMissing (root + "/tools/nixfmt-check")))
    (root + "/migrations")
    (root + "/templates")
    (root + "/static")
    # Non-Rust test fixtures and the shared nginx snippets, if the crate reads them
    # (the local launcher and the integration tests use the same nginx hardening).
    (fileset.maybeMissing (root + "/tests"))
    (fileset.maybeMissing (root + "/nix/nginx"))
    # The alert rules and dashboard the ops tests check.
    (fileset.maybeMissing (root + "/ops"))
  ];
  src = fileset.toSource {
    inherit root;
    fileset = srcFileset;
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
  inherit srcFileset src commonArgs cargoArtifacts package probe;
}
