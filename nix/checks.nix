# `nix flake check` for one system: clippy (warnings denied), rustfmt, the cargo tests
# with real PostgreSQL/RabbitMQ/nginx binaries inside the sandbox, the dependencies (cargo-deny
# by deny.toml, cargo-audit against the locked RustSec database), rustdoc with warnings
# denied, the SBOM built, alejandra and deadnix over the Nix files, and what the package
# source must not contain. The NixOS VM tests live in nix/tests/ and are added by flake.nix.
{
  pkgs,
  craneLib,
  build,
  sbom,
  root,
  # the RustSec advisory database (a non-flake input, locked in flake.lock)
  advisory-db,
}: let
  inherit (pkgs) lib;
  inherit (build) commonArgs cargoArtifacts;

  # What may be in the package's and the tests' sources.
  srcCheck = import ./package-src-check.nix {
    inherit lib root;
    inherit (build) srcFileset testSrcFileset;
  };
  # clippy --all-targets, rustfmt and the tests read the tests' source.
  testArgs = commonArgs // {src = build.testSrc;};

  # The package's source and deny.toml (kept out of the package's own source: editing it
  # rebuilds nothing).
  denySrc = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [build.srcFileset (root + "/deny.toml")];
  };

  # The advisory ids deny.toml's [advisories] ignore lists.
  auditIgnored = lib.concatMap (a: lib.optional (a ? id) a.id) (lib.importTOML (root + "/deny.toml")).advisories.ignore;

  nixFiles = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.fileFilter (file: file.hasExt "nix") root;
  };
in {
  package = build.package;

  package-source = pkgs.runCommand "pageviews-package-source-check" {} (
    if srcCheck.offending == []
    then ''
      touch "$out"
    ''
    else ''
      echo "nix/package.nix: the package or the tests' source holds files their builds do not read:" >&2
      printf '  %s\n' ${lib.escapeShellArgs srcCheck.offending} >&2
      exit 1
    ''
  );

  clippy = craneLib.cargoClippy (testArgs
    // {
      inherit cargoArtifacts;
      cargoClippyExtraArgs = "--workspace --all-targets -- --deny warnings";
    });

  fmt = craneLib.cargoFmt {inherit (testArgs) src pname version;};

  # Licenses, bans and sources by deny.toml: cargoDeny's default checks, offline over the
  # vendored crates, every workspace member a root (as scripts/check-deps runs it). Its
  # advisories check would fetch the database: `audit` reads it locked.
  deny = craneLib.cargoDeny (commonArgs
    // {
      src = denySrc;
      cargoDenyExtraArgs = "--workspace";
    });

  # Cargo.lock against the RustSec database at the rev flake.lock holds (`nix flake update
  # advisory-db` moves it), ignoring the advisories deny.toml ignores (its reasons are there)
  # besides cargoAudit's default `--ignore yanked`.
  audit = craneLib.cargoAudit {
    inherit (commonArgs) src pname version;
    inherit advisory-db;
    cargoAuditExtraArgs = lib.concatMapStringsSep " " (id: "--ignore ${id}") (["yanked"] ++ auditIgnored);
  };

  # The service crate's documentation, rustdoc warnings denied (broken intra-doc links...).
  doc = craneLib.cargoDoc (commonArgs
    // {
      inherit cargoArtifacts;
      cargoDocExtraArgs = "--no-deps --package pageviews";
      env.RUSTDOCFLAGS = "--deny warnings";
    });

  inherit sbom;

  # The integration tests start their own throwaway PostgreSQL, RabbitMQ and nginx from
  # the binaries on PATH (loopback only, data under $TMPDIR), so the sandbox needs no
  # network. cargo test (not nextest) keeps one process per test binary, so a harness
  # shared by all tests of that binary is started once.
  tests = craneLib.cargoTest (testArgs
    // {
      inherit cargoArtifacts;
      # Every member's tests (the workspace's default member is the service only). The
      # journald test needs root for its mount namespace, and the failover test for the
      # iptables rules that cut a node off, which the build sandbox is not; .ci/run runs both
      # as root (vm-ha runs those faults on real hosts).
      cargoTestExtraArgs = "--workspace -- --skip journald:: --skip failover::a_patroni_cluster";
      nativeCheckInputs = [
        pkgs.postgresql
        pkgs.rabbitmq-server
        pkgs.nginx
        pkgs.openssl
        pkgs.curl
        # the browser test (tests/integration/page.rs) and promtool (ops.rs)
        pkgs.chromium
        pkgs.chromedriver
        pkgs.prometheus.cli
        # the alert test (alerting.rs), the restore drill (restore.rs), strict synchronous
        # replication (failover.rs)
        pkgs.prometheus
        pkgs.pgbackrest
        pkgs.patroni
        pkgs.etcd
      ];
      preCheck = ''
        # rabbitmq-server installs its launchers under sbin/, which stdenv does not put on PATH.
        export PATH="${pkgs.rabbitmq-server}/sbin:$PATH"
        export HOME="$(mktemp -d)"
        export TMPDIR="''${TMPDIR:-/tmp}"
        export LANG=C.UTF-8
      '';
    });

  alejandra = pkgs.runCommand "pageviews-alejandra-check" {nativeBuildInputs = [pkgs.alejandra];} ''
    alejandra --check ${nixFiles}
    touch "$out"
  '';

  deadnix = pkgs.runCommand "pageviews-deadnix-check" {nativeBuildInputs = [pkgs.deadnix];} ''
    deadnix --fail ${nixFiles}
    touch "$out"
  '';
}
