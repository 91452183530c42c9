# The crane build of the workspace: dependencies once (cargoArtifacts), then what ships:
# `package` is the service crate only (pageviews-app, pageviews-worker and the static files
# nginx serves); `probe` is pageviews-probe, for the VM tests. The launcher
# (pageviews-stack) and the benchmark are tools for a checkout, not packaged.
{
  lib,
  craneLib,
  # pkgs.writeTextDir, for the setup hook below
  writeTextDir,
  root,
}: let
  inherit (lib) fileset;

  # The workspace's tool members (tools/*: launcher, testbed, bench, probe), from Cargo.toml.
  toolMembers = lib.filter (m: m != ".") (lib.importTOML (root + "/Cargo.toml")).workspace.members;

  # Two sources, each holding only what its builds read, so that editing anything else
  # rebuilds nothing:
  # - `src`, the package's: the service crate (its manifest and Rust sources, what it reads at
  #   compile time: askama templates, diesel migrations; the static files installed beside
  #   it), the lock file, and only the manifests of the tool members: cargo loads every member
  #   to build one, and `stubToolTargets` gives the missing ones an empty target.
  # - `testSrc`, for clippy --all-targets, rustfmt, the tests and the probe: `src` plus the
  #   tools' sources, the integration tests, the setup SQL and script of src/ (the NixOS
  #   module runs them, the tests too), the nginx snippets the testbed embeds and the ops
  #   files the tests check.
  # nix/package-src-check.nix says what may be in each; `nix flake check` and scripts/check-nix
  # fail on anything else, and .ci/run runs the builds and the tests in exactly these files
  # (scripts/nix-source materialises them).
  srcFileset = fileset.unions ([
      (root + "/Cargo.toml")
      (root + "/Cargo.lock")
      (root + "/build.rs")
      (fileset.fileFilter (f: f.hasExt "rs") (root + "/src"))
      (root + "/migrations")
      (root + "/templates")
      (root + "/static")
    ]
    ++ map (m: root + "/${m}/Cargo.toml") toolMembers);
  testSrcFileset = fileset.unions ([
      srcFileset
      # The database and broker setup the NixOS module runs; the tests run the same files.
      (fileset.fileFilter (f: f.hasExt "sql" || f.hasExt "sh") (root + "/src"))
      (root + "/tests")
      # rustfmt's settings; README, whose stack commands tools/stack's tests check.
      (root + "/rustfmt.toml")
      (root + "/README.md")
      (root + "/nix/nginx")
      (root + "/ops")
      # The settings' defaults, and the module and README that state them: a test compares them
      # with the binaries' (tests/integration/config_errors.rs).
      (root + "/nix/modules/settings-defaults.json")
      (root + "/nix/modules/default.nix")
    ]
    ++ map (m: craneLib.fileset.commonCargoSources (root + "/${m}")) toolMembers);

  # A tool member whose sources the package's source leaves out gets an empty library, so
  # that cargo can load the workspace (it builds only `--package pageviews`). In the tests'
  # source every member is whole and this changes nothing. scripts/nix-source runs the same
  # text on the copy .ci/run builds in.
  stubToolTargets =
    lib.concatMapStrings (m: ''
      if [ ! -d ${m}/src ]; then mkdir -p ${m}/src && : > ${m}/src/lib.rs; fi
    '')
    toolMembers;
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
    # A setup hook (the file makeSetupHook writes) running stubToolTargets after the patch phase.
    nativeBuildInputs = [
      (writeTextDir "nix-support/setup-hook" ''
        pageviewsStubToolTargets() {
        ${stubToolTargets}}
        postPatchHooks+=(pageviewsStubToolTargets)
      '')
    ];
    # Pure Rust (rustls/ring, a Rust PostgreSQL driver): no C libraries to link.
    buildInputs = [];
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
      src = testSrc;
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
  inherit srcFileset testSrcFileset stubToolTargets src testSrc commonArgs cargoArtifacts package probe;
}
