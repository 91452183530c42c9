# Which files of the package source (nix/package.nix `srcFileset`) should not be in it:
# tools/nixfmt-check (its own crate, for scripts/check-nix only), scripts/, .ci/, and nix/ except the nginx snippets the crate embeds (nix/nginx/). Each one
# would rebuild the package when edited. Needs only nixpkgs' lib (lib.fileset):
# checks.nix fails `nix flake check` on a non-empty `offending`; scripts/check-nix
# evaluates it with the nixos-eval harness's lib when that is present.
{
  lib,
  root,
  srcFileset,
}: let
  prefix = toString root + "/";
  files = map (f: lib.removePrefix prefix (toString f)) (lib.fileset.toList srcFileset);
  outside = f:
    lib.any (p: lib.hasPrefix p f) ["tools/nixfmt-check/" "scripts/" ".ci/"]
    || (lib.hasPrefix "nix/" f && !lib.hasPrefix "nix/nginx/" f);
in {
  inherit files;
  offending = lib.filter outside files;
}
