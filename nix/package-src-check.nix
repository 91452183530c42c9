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
  # cargo loads every workspace member to build one: their manifests and Rust sources.
  cargoSource = f:
    (lib.hasSuffix ".rs" f || lib.hasSuffix ".toml" f || baseNameOf f == "Cargo.lock")
    && !(under ["tests/" "tools/nixfmt-check/"] f);
  inPackage = f: cargoSource f || under ["migrations/" "templates/" "static/"] f;
  setupFile = f: lib.hasPrefix "src/" f && (lib.hasSuffix ".sql" f || lib.hasSuffix ".sh" f);
  inTests = f: inPackage f || setupFile f || under ["tests/" "nix/nginx/" "ops/"] f || builtins.elem f ["nix/modules/settings-defaults.json" "README.md"];
  files = relative srcFileset;
  testFiles = relative testSrcFileset;
in {
  inherit files testFiles;
  offending = lib.filter (f: !inPackage f) files ++ lib.filter (f: !inTests f) testFiles;
}
