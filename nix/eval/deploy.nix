# Scenarios for the deploy-rs rollout (flake output `deploy`, nix/deploy.nix), merged into
# scenarios.nix's `checks`. The harness calls flake.nix's outputs with stub inputs for
# nixpkgs and crane only (flake-eval.nix, read-only), so `deploy`, which reads the deploy-rs
# input, is evaluated here instead: nix/deploy.nix over the flake's own nixosConfigurations
# (built by the harness), with `activate.nixos` taken from deploy-rs' real flake.nix (its
# overlay, transcribed into the harness cache as <cache>/deploy-rs/flake.nix) applied to
# stub pkgs, and the result checked against deploy-rs' real JSON schema
# (<cache>/deploy-rs/interface.json), the file its deployChecks' deploy-schema check uses.
{
  lib,
  pkgs,
  paths,
  check,
  skipped,
  failedAssertions,
  root,
  flake,
}: let
  files = {
    flake = paths.cache + "/deploy-rs/flake.nix";
    schema = paths.cache + "/deploy-rs/interface.json";
  };
  missing = lib.filter (f: !builtins.pathExists f) (lib.attrValues files);
  whenCached = c:
    if missing != []
    then skipped "not in the cache: ${toString missing}"
    else c;

  fake = name: extra:
    {
      type = "derivation";
      inherit name;
      outPath = "${paths.fakestore}/${name}";
      meta = {};
    }
    // extra;
  # What deploy-rs' overlay takes from the final package set: buildEnv and writeTextFile
  # record their arguments, so the scenario can read the activation scripts.
  final =
    pkgs
    // {
      runtimeShell = "/bin/sh";
      buildEnv = args: fake args.name {inherit args;};
      writeTextFile = args: fake args.name {inherit args;};
      writeScript = name: text: fake name {inherit text;};
      deploy-rs.deploy-rs = fake "deploy-rs" {};
    };
  # Its outputs with stub inputs: only the overlay is used (its per-system outputs, which build
  # deploy-rs, are left empty).
  deployRsLib =
    ((import files.flake).outputs {
      self = {};
      nixpkgs = {};
      utils.lib = {
        defaultSystems = [];
        eachSystem = _: _: {};
      };
    })
    .overlays
    .default
    final
    pkgs;
  # A NixOS system as activate.nixos reads it: the harness has no system.build.toplevel (it
  # builds nothing); a named fake stands for it, per host.
  withToplevel = name: cfg:
    cfg.extendModules {
      modules = [
        {
          options.system.build.toplevel = lib.mkOption {type = lib.types.unspecified;};
          config.system.build.toplevel = fake "nixos-system-${name}" {};
          config.boot.loader.systemd-boot.enable = false;
          config.boot.loader.efi.efiSysMountPoint = "/boot";
        }
      ];
    };
  hosts = import (root + "/nix/hosts/fleet.nix") {inherit lib;};
  deploy = import (root + "/nix/deploy.nix") {
    inherit lib hosts;
    nixosConfigurations = lib.mapAttrs withToplevel flake.self.nixosConfigurations;
    activateNixos = deployRsLib.deploy-rs.lib.activate.nixos;
  };
  # What `nix flake check`'s deploy-schema serialises (builtins.toJSON deploy).
  deployJson = builtins.fromJSON (builtins.toJSON deploy);

  # The JSON-schema features interface.json uses ($ref, allOf, type, properties,
  # patternProperties, additionalProperties = false, required, items, uniqueItems), checked
  # as draft 2019-09 defines them; each error is a string with the JSON path.
  schema = builtins.fromJSON (builtins.readFile files.schema);
  resolve = s:
    if s ? "$ref"
    then lib.getAttrFromPath (lib.tail (lib.splitString "/" (lib.removePrefix "#" s."$ref"))) schema
    else s;
  typeOk = t: v:
    {
      object = builtins.isAttrs v;
      string = builtins.isString v;
      boolean = builtins.isBool v;
      integer = builtins.isInt v;
      array = builtins.isList v;
    }
    .${t};
  matches = re: k: builtins.match ".*${re}.*" k != null;
  validate = at: s0: v: let
    s = resolve s0;
    props = s.properties or {};
    pats = s.patternProperties or {};
    keys = lib.optionals (builtins.isAttrs v) (lib.attrNames v);
    patKeys = k: lib.filter (re: matches re k) (lib.attrNames pats);
  in
    lib.optional (s ? type && !typeOk s.type v) "${at}: not a ${s.type}"
    ++ lib.concatMap (sub: validate at sub v) (s.allOf or [])
    ++ lib.optionals (builtins.isAttrs v) (
      map (k: "${at}: ${k} is required") (lib.filter (k: !(v ? ${k})) (s.required or []))
      ++ lib.concatMap (k: lib.optionals (props ? ${k}) (validate "${at}.${k}" props.${k} v.${k})) keys
      ++ lib.concatMap (k: lib.concatMap (re: validate "${at}.${k}" pats.${re} v.${k}) (patKeys k)) keys
      ++ lib.optionals ((s.additionalProperties or true) == false) (
        map (k: "${at}: ${k} is not allowed") (lib.filter (k: !(props ? ${k}) && patKeys k == []) keys)
      )
    )
    ++ lib.optionals (builtins.isList v && s ? items) (lib.concatLists (lib.imap0 (i: x: validate "${at}[${toString i}]" s.items x) v))
    ++ lib.optional (builtins.isList v && (s.uniqueItems or false) && lib.length (lib.unique v) != lib.length v) "${at}: items not unique";
in {
  checks = {
    # Every host of both topologies is a deploy-rs node at its address, whose system profile is
    # deploy-rs' activation of that host's configuration (switch-to-configuration switch), with
    # magic rollback; the whole output passes deploy-rs' schema, and a broken one fails it.
    deployNodes = whenCached (let
      errors = validate "deploy" schema deployJson;
      broken = validate "deploy" schema (deployJson // {nodes.x.profiles.system.path = 1;});
      nodes = deploy.nodes;
      activation = n: let
        paths' = nodes.${n}.profiles.system.path.args.paths;
      in {
        base = (lib.head paths').name;
        script = (lib.elemAt paths' 1).args.text;
      };
      wantNodes = ["cluster-app1" "cluster-app2" "cluster-broker1" "cluster-broker2" "cluster-broker3" "cluster-db" "cluster-proxy" "split-app" "split-data" "split-proxy"];
      hostsFailing = lib.filterAttrs (_: fa: fa != []) (lib.mapAttrs (_: failedAssertions) (lib.filterAttrs (n: _: n != "example") flake.self.nixosConfigurations));
    in
      check (errors
        == []
        && broken != []
        && lib.attrNames nodes == wantNodes
        && hostsFailing == {}
        && deploy.magicRollback
        && deploy.autoRollback
        && nodes.split-app.hostname == "10.0.0.2"
        && lib.all (n: (activation n).base == "nixos-system-${n}" && lib.hasInfix "$PROFILE/bin/switch-to-configuration switch" (activation n).script) wantNodes) {
        inherit errors broken hostsFailing deployJson;
        nodes =
          lib.mapAttrs (n: v: {
            inherit (v) hostname;
            activation = activation n;
          })
          nodes;
      });
  };
}
