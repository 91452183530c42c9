# What may be in the package source (nix/package.nix `srcFileset`) and in the tests' source
# (`testSrcFileset`); anything else would rebuild them when edited. Needs only nixpkgs' lib
# (lib.fileset): checks.nix fails `nix flake check` on a non-empty `offending`, and
# scripts/check-nix evaluates it with the nixos-eval harness's lib when that is present.
{
  lib,
  root,
  srcFileset,
  testSrcFileset,
}: let
  prefix = toString root + "/";
  relative = set: map (f: lib.removePrefix prefix (toString f)) (lib.fileset.toList set);
  under = dirs: f: lib.any (d: lib.hasPrefix d f) dirs;
  # The service crate, the lock file and the tool members' manifests (cargo loads every
  # member to build one).
  inPackage = f:
    lib.elem f ["Cargo.toml" "Cargo.lock" "build.rs"]
    || (lib.hasPrefix "src/" f && lib.hasSuffix ".rs" f)
    || (lib.hasPrefix "tools/" f && baseNameOf f == "Cargo.toml" && !(under ["tools/nixfmt-check/"] f))
    || under ["migrations/" "templates/" "static/"] f;
  toolSource = f: under ["tools/"] f && !(under ["tools/nixfmt-check/"] f) && (lib.hasSuffix ".rs" f || lib.hasSuffix ".toml" f);
  setupFile = f: lib.hasPrefix "src/" f && (lib.hasSuffix ".sql" f || lib.hasSuffix ".sh" f);
  inTests = f:
    inPackage f
    || toolSource f
    || setupFile f
    || lib.elem f ["rustfmt.toml" "README.md" "nix/modules/settings-defaults.json" "nix/modules/default.nix"]
    || under ["tests/" "nix/nginx/" "ops/"] f;
  files = relative srcFileset;
  testFiles = relative testSrcFileset;
in {
  inherit files testFiles;
  offending = lib.filter (f: !inPackage f) files ++ lib.filter (f: !inTests f) testFiles;
}
