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
  # Everything else (nix/, scripts/, docs, tools/) stays out, so editing it does not rebuild:
  # commonCargoSources takes every *.rs / *.toml / Cargo.lock under root, which would include
  # tools/nixfmt-check (a crate of its own, used only by scripts/check-nix), so tools/ is cut
  # out of it. nix/package-src-check.nix fails `nix flake check` and scripts/check-nix if a
  # file of tools/, nix/ (but nix/nginx/), scripts/ or .ci/ gets back in.
  srcFileset = fileset.unions [
    (fileset.difference (craneLib.fileset.commonCargoSources root) (fileset.maybeMissing (root + "/tools")))
    (root + "/migrations")
    (root + "/templates")
    (root + "/static")
    # Non-Rust test fixtures and the shared nginx snippets, if the crate reads them
    # (the local launcher and the integration tests use the same nginx hardening).
    (fileset.maybeMissing (root + "/tests"))
    (fileset.maybeMissing (root + "/nix/nginx"))
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
  inherit srcFileset src commonArgs cargoArtifacts package;
}
