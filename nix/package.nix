# The crane build of the `pageviews` crate: dependencies once (cargoArtifacts), then the
# package, which installs pageviews-app, pageviews-worker, pageviews-probe and
# pageviews-stack plus the static files nginx serves.
{
  lib,
  craneLib,
  root,
}: let
  inherit (lib) fileset;

  # cleanCargoSource would drop what the crate reads at compile time (askama templates,
  # diesel migrations) and the static files we install, so list them explicitly.
  # Everything else (nix/, scripts/, docs) stays out, so editing it does not rebuild.
  src = fileset.toSource {
    inherit root;
    fileset = fileset.unions [
      (craneLib.fileset.commonCargoSources root)
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
in {
  inherit src commonArgs cargoArtifacts package;
}
