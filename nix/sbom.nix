# packages.<system>.sbom: a CycloneDX 1.5 (JSON) bill of materials of the service crate, what
# `packages.default` ships (pageviews-app, pageviews-worker): every crate it is built from for
# this system, build-time ones included, dev-dependencies not, each with version, license,
# crates.io purl and SHA-256. cargo-cyclonedx reads cargo's metadata offline, over the crates
# vendored for the package's own build (crane's vendorCargoDeps on the same source): nothing
# is compiled. With cargo-cyclonedx 0.5.9 or later the file is reproducible: the timestamp is
# stdenv's SOURCE_DATE_EPOCH and no random serial number is written.
{
  pkgs,
  craneLib,
  build,
}:
craneLib.mkCargoDerivation (build.commonArgs
  // {
    pnameSuffix = "-sbom";
    cargoArtifacts = null;
    doInstallCargoArtifacts = false;
    cargoVendorDir = craneLib.vendorCargoDeps {inherit (build) src;};
    nativeBuildInputs = [pkgs.cargo-cyclonedx];
    # One file beside each workspace member's Cargo.toml; the service crate is the root one.
    buildPhaseCargoCommand = ''
      cargo cyclonedx --format json --spec-version 1.5 --describe crate
    '';
    installPhaseCommand = ''
      install -D -m 0644 pageviews.cdx.json "$out/pageviews.cdx.json"
    '';
  })
