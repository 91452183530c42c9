# The project's own scenarios for the nixos-eval harness (../shared/nixos-eval, README.md
# there): what the module must keep, evaluated with the harness's real nixpkgs lib and the real
# nginx, postgresql, rabbitmq, firewall and systemd-unit declarations of its cache, next to
# the scenarios the harness itself runs. Nothing of the harness or its cache is in this
# repository; this file only calls it. scripts/nixos-eval runs every entry of `checks`
# (one nix-instantiate each, so one evaluation error cannot hide the others):
#   nix-instantiate --read-write-mode --eval --strict --json nix/eval/scenarios.nix \
#     --argstr harness DIR --argstr project DIR --argstr cache DIR -A checks.<name>
# Each check is { ok = bool; detail = what was seen; }.
{
  harness,
  project,
  cache,
}: let
  paths = import (/. + harness + "/paths.nix") {inherit project cache;};
  h = import (/. + harness + "/eval.nix") {inherit project cache;};
  lib = import (paths.need "lib");
  pkgs = import (/. + harness + "/stubs/pkgs.nix") {
    inherit lib;
    inherit (paths) fakestore;
  };
  root = paths.project;
  flake = import (/. + harness + "/flake-eval.nix") {inherit project cache;};

  fakePackage = {
    type = "derivation";
    name = "pageviews-0.1.0";
    pname = "pageviews";
    version = "0.1.0";
    outPath = "${paths.fakestore}/pageviews-0.1.0";
    meta.mainProgram = "pageviews-app";
  };
  module = root + "/nix/modules/default.nix";
  withPackage = {services.pageviews.package = lib.mkDefault fakePackage;};
  eval = modules: h.evalHostWith modules;
  failedAssertions = ev: map (a: a.message) (lib.filter (a: !a.assertion) ev.config.assertions);
  noFailedAssertions = ev: failedAssertions ev == [];

  # A split host as vm-split's nodes are (proxy .1, app .2, data .3), plus an IPv6 proxy.
  secrets = import (root + "/nix/tests/secrets.nix") {inherit pkgs;};
  split = roles: extra:
    eval [
      module
      withPackage
      {
        services.pageviews = {
          enable = true;
          inherit roles;
          network = {
            appAddress = "192.168.1.2";
            dataAddress = "192.168.1.3";
            proxyAddresses = ["192.168.1.1" "fd00::1"];
          };
          database.passwordFiles = secrets.database;
          rabbitmq.passwordFiles = secrets.rabbitmq;
          tls = {
            certificateFile = "/var/lib/pageviews-test/cert.pem";
            keyFile = "/var/lib/pageviews-test/key.pem";
          };
        };
      }
      extra
    ];
  nftables = {networking.nftables.enable = true;};
  firewallOf = ev: {
    inherit (ev.config.networking.firewall) extraCommands extraInputRules;
    nftablesEnabled = ev.config.networking.nftables.enable;
    nftTable = ev.config.networking.nftables.tables.nixos-fw.content or null;
    failedAssertions = failedAssertions ev;
  };
  has = lib.hasInfix;
  check = ok: detail: {inherit ok detail;};

  dataRules = {
    nft = "ip saddr { 192.168.1.2 } tcp dport { 5432, 5672 } accept";
    ipt = [
      "iptables -w -A nixos-fw -p tcp -s 192.168.1.2 --dport 5432 -j nixos-fw-accept"
      "iptables -w -A nixos-fw -p tcp -s 192.168.1.2 --dport 5672 -j nixos-fw-accept"
    ];
  };
  appRules = {
    nft = ["ip saddr { 192.168.1.1 } tcp dport { 8000 } accept" "ip6 saddr { fd00::1 } tcp dport { 8000 } accept"];
    ipt = [
      "iptables -w -A nixos-fw -p tcp -s 192.168.1.1 --dport 8000 -j nixos-fw-accept"
      "ip6tables -w -A nixos-fw -p tcp -s fd00::1 --dport 8000 -j nixos-fw-accept"
    ];
  };
  iptablesHost = rules: ev: let
    f = firewallOf ev;
  in
    check (f.failedAssertions == [] && !f.nftablesEnabled && f.extraInputRules == "" && lib.all (r: has r f.extraCommands) rules) f;
  nftablesHost = rules: ev: let
    f = firewallOf ev;
  in
    check (f.failedAssertions == [] && f.nftablesEnabled && f.extraCommands == "" && lib.all (r: has r f.extraInputRules && has r f.nftTable) rules) f;

  # Another module of the host using the iptables firewall's extraCommands (with
  # nftables forced on by a split role this failed nftables' assertion).
  otherIptablesUser = {networking.firewall.extraCommands = "iptables -w -A nixos-fw -p tcp --dport 9999 -j nixos-fw-accept";};

  # networking.firewall.backend exists only in newer nixpkgs; declare it for this scenario
  # when the cached firewall.nix does not.
  cachedFirewall = builtins.readFile (paths.need "nixpkgs/nixos/modules/services/networking/firewall.nix");
  backendOption = lib.optional (!has "backend = lib.mkOption" cachedFirewall) {
    options.networking.firewall.backend = lib.mkOption {type = lib.types.str;};
  };

  # `nix run .#vm`: the example host with its VM variant applied. A harness that evaluates
  # it the way build-vm.nix does (extendModules + qemu-vm.nix) has `exampleVm`; otherwise the
  # variant's definitions are added as one more module (virtualisation.* is a stub there).
  exampleFile = root + "/nix/hosts/example.nix";
  vmVariant = (import exampleFile {inherit lib;}).virtualisation.vmVariant;
  exampleVm = h.exampleVm or (eval [module withPackage exampleFile vmVariant]);
  nginxConfOf = ev: builtins.readFile ev.config.environment.etc."nginx/nginx.conf".source;
  countOf = needle: text: lib.length (lib.splitString needle text) - 1;

  # nix/modules/default.nix on its own: mkPackageOption's pkgs.pageviews, with and without
  # the flake's overlays.default.
  direct = extraPkgs:
    eval [
      module
      {_module.args.pkgs = lib.mkForce (pkgs // extraPkgs);}
      {
        services.pageviews = {
          enable = true;
          tls.selfSigned = true;
        };
      }
    ];
  overlaid = flake.self.overlays.default (pkgs // overlaid) pkgs;

  # The units' serviceConfig as units.nix deploys it on one host with the defaults, against
  # service-config.nix's `singleHost`, which scripts/systemd-score scores.
  pure = import (root + "/nix/modules/service-config.nix");
  example = h.example;
  withoutExec = lib.mapAttrs (_: c: removeAttrs c ["ExecStart" "ExecStartPre"]);
  deployed = withoutExec (lib.genAttrs (lib.attrNames pure.singleHost) (n: example.config.systemd.services.${n}.serviceConfig));
  scored = withoutExec pure.singleHost;

  # The VM tests (nix/tests), each as the test framework evaluates it: its nodes with the
  # addresses nixos/lib/testing/network.nix gives (sorted names -> 192.168.1.<n>) and `nodes`
  # the attrset of their configs, then its testScript applied to them. The constants the
  # Python gets are read from the nodes' options, so a wrong option path there fails here
  # rather than in a VM build. (The harness evaluates some nodes of three of the tests, but no
  # script: its runNixOSTest stub wants a string, where nixos/lib/testing/testScript.nix
  # declares `either str (functionTo str)`.)
  # The images as the flake's outputs give them (the harness's buildLayeredImage stub: what a
  # real one returns, `imageName`/`imageTag`, and nothing of our `passthru`), with the ports
  # beside them.
  flakeImages = {
    packages = {inherit (flake.self.packages.x86_64-linux) app-image worker-image;};
    inherit
      (import (root + "/nix/images.nix") {
        pkgs = throw "images.nix: ports need no pkgs";
        package = throw "images.nix: ports need no package";
      })
      ports
      ;
  };
  testArgs = {
    inherit pkgs secrets;
    tls = import (root + "/nix/tests/tls.nix") {inherit pkgs;};
    module = {imports = [module withPackage];};
    probe = fakePackage // {name = "pageviews-probe-0.1.0";};
    images = flakeImages;
  };
  # `specialisation` (nixos/modules/system/activation/specialisation.nix), which the harness
  # neither loads nor stubs: there `configuration` is typed as the parent extended with
  # extendModules; here it is a deferred module that `specialised` applies the same way.
  specialisationStub = {
    options.specialisation = lib.mkOption {
      default = {};
      type = lib.types.attrsOf (lib.types.submodule {
        options.inheritParentConfig = lib.mkOption {
          type = lib.types.bool;
          default = true;
        };
        options.configuration = lib.mkOption {
          type = lib.types.deferredModule;
          default = {};
        };
      });
    };
  };
  specialised = ev: lib.mapAttrs (_: s: ev.extendModules {modules = [s.configuration];}) ev.config.specialisation;
  vmNodes = vmNodesWith [];
  # `extra`: modules added to every node (the data tier's real modules and stubs, below).
  vmNodesWith = extra: file: let
    test = import (root + "/nix/tests/${file}") testArgs;
    names = lib.sort lib.lessThan (lib.attrNames test.nodes);
    num = lib.listToAttrs (lib.imap1 (i: n: lib.nameValuePair n i) names);
    evs = lib.mapAttrs (n: m:
      eval ([
          m
          specialisationStub
          {
            networking.hostName = n;
            networking.primaryIPAddress = "192.168.1.${toString num.${n}}";
            _module.args.nodes = lib.mkForce nodes;
          }
        ]
        ++ extra))
    test.nodes;
    nodes = lib.mapAttrs (_: e: e.config) evs;
  in {inherit test evs nodes;};
  vmTest = vmTestWith [];
  vmTestWith = extra: file: let
    inherit (vmNodesWith extra file) test evs nodes;
    script = test.testScript {inherit nodes;};
    failed = lib.filterAttrs (_: fa: fa != []) (lib.mapAttrs (_: failedAssertions) evs);
    commonPy = builtins.readFile (root + "/nix/tests/common.py");
  in
    check (failed == {} && has commonPy script) {
      inherit (test) name;
      failedAssertions = failed;
      # the lines before common.py: the constants
      constants = lib.head (lib.splitString commonPy script);
    };

  # Monitoring with the real services.prometheus declarations, where the cache has them (an
  # extension of the harness's cache: nixos/modules/services/monitoring/prometheus/default.nix
  # at the cache's nixpkgs path).
  prometheusModule = paths.cache + "/nixpkgs/nixos/modules/services/monitoring/prometheus/default.nix";
  # pageviews with its Prometheus jobs on one host, with `modules` besides.
  monitored = modules:
    eval ([
        module
        withPackage
        {
          services.pageviews = {
            enable = true;
            tls.selfSigned = true;
            prometheus.enable = true;
          };
        }
      ]
      ++ modules);
  # A deploy (`nixos-rebuild switch`) as switch-to-configuration and systemd carry it out.
  # For each unit whose file changed, switch-to-configuration leaves it (restartIfChanged =
  # false), reloads it (reloadIfChanged), restarts it in place (stopIfChanged = false), or
  # else stops it before the activation and starts it after; systemd stops with a unit every
  # unit that Requires=, BindsTo= or is PartOf= it (and stopped that way they wait for the
  # start phase too). `stoppedBy old new` is the set of units a switch from old to new stops.
  unitsOf = ev: let
    sl = ev._module.args.utils.systemdUtils.lib;
    c = ev.config.systemd;
  in
    lib.mapAttrs' (n: s: lib.nameValuePair "${n}.service" (s // {text = (sl.serviceToUnit s).text + scriptsOf s;})) c.services
    // lib.mapAttrs' (n: s: lib.nameValuePair "${n}.socket" (s // {text = (sl.socketToUnit s).text;})) c.sockets
    // lib.mapAttrs' (n: t: lib.nameValuePair "${n}.target" (t // {text = (sl.targetToUnit t).text;})) c.targets;
  # The harness's stub store paths are named, not hashed: a script whose text changed keeps its
  # path there, where a real store path changes, so the texts count too.
  scriptsOf = s: lib.concatMapStrings (v: v.text or "") (lib.filter builtins.isAttrs (lib.flatten (lib.attrValues s.serviceConfig)));
  hardDeps = u: u.requires ++ u.bindsTo ++ u.partOf;
  # `first` and every unit that Requires=, BindsTo= or is PartOf= one of them, transitively.
  stopClosure = units: first: let
    grow = set: lib.unique (set ++ lib.filter (n: lib.any (d: lib.elem d set) (hardDeps units.${n})) (lib.attrNames units));
  in
    lib.foldl' (set: _: grow set) first (lib.attrNames units);
  stoppedBy = old: new: let
    a = unitsOf old;
    b = unitsOf new;
    changed = lib.filter (n: a ? ${n} && a.${n}.text != b.${n}.text) (lib.attrNames b);
    stopsWhenChanged = u: (u.restartIfChanged or true) && !(u.reloadIfChanged or false) && (u.stopIfChanged or true);
    first = lib.filter (n: stopsWhenChanged b.${n}) changed;
  in {
    inherit changed;
    stopped = stopClosure b first;
  };
  # The units that must stay up through a deploy: the app's socket keeps connections waiting
  # while the app and the worker are restarted in place; nginx reloads or restarts in place.
  staysUp = ["pageviews-app.socket" "pageviews-app.service" "pageviews-worker.service" "nginx.service"];
  exampleWith = modules: eval ([module exampleFile] ++ modules);
  otherPackage = fakePackage // {outPath = "${paths.fakestore}/pageviews-0.1.0-other";};

  # The daily logical backup with the real services.postgresqlBackup, where the cache has it
  # (an extension of the harness's cache, like the prometheus module).
  backupModule = paths.cache + "/nixpkgs/nixos/modules/services/backup/postgresql-backup.nix";
  # It compresses with pkgs.gzip, which the harness's pkgs lacks.
  withGzip = {
    _module.args.pkgs = lib.mkForce (pkgs
      // {
        gzip = {
          type = "derivation";
          name = "gzip";
          outPath = "${paths.fakestore}/gzip";
        };
      });
  };

  # `expected`: per unit (app, worker, migrate), variables its environment must hold. Also:
  # ExecStart is the binary; every `%d/<name>` is a credential the unit loads; no URL holds
  # a password; system.checks has the build-time check, which runs both binaries'
  # check-config over what the units get, without `%d` or a credential's file.
  unitsTakePasswordFiles = ev: expected: let
    services = ev.config.systemd.services;
    bin = "${fakePackage}/bin";
    exec = {
      app = "${bin}/pageviews-app";
      worker = "${bin}/pageviews-worker";
      migrate = "${bin}/pageviews-app migrate";
    };
    unit = name: services."pageviews-${name}";
    seen =
      lib.mapAttrs (name: _: {
        inherit (unit name) environment;
        ExecStart = (unit name).serviceConfig.ExecStart;
        LoadCredential = lib.toList ((unit name).serviceConfig.LoadCredential or []);
      })
      exec;
    credentialsLoaded = u: map (c: lib.head (lib.splitString ":" c)) u.LoadCredential;
    passwordFilesLoaded = u:
      lib.all (v: !lib.hasPrefix "%d/" v || lib.elem (lib.removePrefix "%d/" v) (credentialsLoaded u)) (lib.attrValues u.environment);
    noPasswordInUrls = u: lib.all (n: !(u.environment ? ${n}) || builtins.match ".*://[^/@]*:[^/@]*@.*" u.environment.${n} == null) ["DATABASE_URL" "AMQP_URL"];
    checks = lib.filter (d: d.name == "runCommand-pageviews-checked-settings") ev.config.system.checks;
    cmd = (lib.head checks).cmd or "";
  in
    check (noFailedAssertions ev
      && lib.all (n: seen.${n}.ExecStart == exec.${n}) (lib.attrNames exec)
      && lib.all (n: lib.all (k: seen.${n}.environment.${k} or null == expected.${n}.${k}) (lib.attrNames expected.${n})) (lib.attrNames expected)
      && lib.all passwordFilesLoaded (lib.attrValues seen)
      && lib.all noPasswordInUrls (lib.attrValues seen)
      && lib.length checks == 1
      && has "${bin}/pageviews-app check-config --json" cmd
      && has "${bin}/pageviews-worker check-config --json" cmd
      && has "pageviews-check-placeholder-password" cmd
      && !has "%d/" cmd) {
      inherit seen cmd;
      failedAssertions = failedAssertions ev;
    };

  # The data tier (nix/modules/database-ha.nix, pgbackrest.nix) with the real patroni, etcd and
  # pgbackrest modules, where the cache has them (an extension of the harness's cache, like the
  # prometheus module: transcribed from faukah/nixpkgs@3b20077c at their nixpkgs paths).
  haModules = map (f: paths.cache + "/nixpkgs/nixos/modules/services/${f}") [
    "cluster/patroni/default.nix"
    "databases/etcd.nix"
    "backup/pgbackrest.nix"
  ];
  haCached = lib.all builtins.pathExists haModules;
  haMissing = "no ${lib.concatStringsSep ", " (lib.filter (f: !builtins.pathExists f) haModules)}";
  # What those modules (and vm-ha's repository host) use that the harness neither loads nor
  # stubs, stubbed here: options with loose types, and packages. pkgs.formats.yaml writes JSON
  # (a subset of YAML) to a real file, pkgs.formats.ini lib.generators.toINI, so the scenarios
  # read what Patroni and pgBackRest would be given.
  yamlValue = with lib.types; nullOr (oneOf [bool int float str path (attrsOf yamlValue) (listOf yamlValue)]);
  fakePkg = name: {
    type = "derivation";
    inherit name;
    outPath = "${paths.fakestore}/${name}";
    meta.mainProgram = name;
  };
  haPkgs =
    pkgs
    // {
      formats = {
        yaml = _: {
          type = yamlValue;
          generate = name: value: pkgs.writeText name (builtins.toJSON value);
        };
        ini = {listsAsDuplicateKeys ? false, ...}: {
          type = lib.types.attrsOf (lib.types.attrsOf yamlValue);
          generate = name: value: pkgs.writeText name (lib.generators.toINI {inherit listsAsDuplicateKeys;} value);
        };
      };
    }
    // lib.genAttrs ["patroni" "etcd" "pgbackrest" "openssh"] fakePkg;
  haStubs = {
    options = {
      services.udev.extraRules = lib.mkOption {
        type = lib.types.lines;
        default = "";
      };
      environment.sessionVariables = lib.mkOption {
        type = lib.types.attrsOf lib.types.str;
        default = {};
      };
      systemd.tmpfiles.settings = lib.mkOption {
        type = lib.types.attrsOf (lib.types.attrsOf (lib.types.attrsOf (lib.types.attrsOf yamlValue)));
        default = {};
      };
      # sshd.nix (not loaded): its enable and hostKeys, and the users' authorizedKeys.
      services.openssh = {
        enable = lib.mkOption {
          type = lib.types.bool;
          default = false;
        };
        hostKeys = lib.mkOption {
          type = lib.types.listOf lib.types.attrs;
          default = [];
        };
      };
      users.users = lib.mkOption {
        type = lib.types.attrsOf (lib.types.submodule {
          options.openssh.authorizedKeys.keyFiles = lib.mkOption {
            type = lib.types.listOf lib.types.path;
            default = [];
          };
        });
      };
    };
    config._module.args.pkgs = lib.mkForce haPkgs;
  };
  haExtra = haModules ++ [haStubs];
  ha = vmNodesWith haExtra "vm-ha.nix";
  # The three database hosts, the app host: their addresses as the test framework gives them.
  haIp = name: ha.nodes.${name}.networking.primaryIPAddress;
  haDbs = ["db1" "db2" "db3"];
  # A database host outside the VM test with `modules` besides (assertion scenarios).
  haHost = modules:
    eval ([
        module
        withPackage
        {
          networking.hostName = "db1";
          services.pageviews = {
            enable = true;
            roles = ["database"];
            database.passwordFiles = secrets.database;
            rabbitmq.passwordFiles = secrets.rabbitmq;
            rabbitmq.cluster = {
              nodes = [
                {
                  hostName = "broker";
                  address = "192.168.1.9";
                }
              ];
              cookieFile = secrets.erlangCookie;
            };
            database.ha = {
              enable = true;
              nodes = lib.imap1 (i: n: {
                hostName = n;
                address = "192.168.1.${toString (10 + i)}";
              }) ["db1" "db2" "db3"];
              passwordFiles = lib.genAttrs ["superuser" "replication" "rewind"] (w: "/run/secrets/patroni-${w}");
            };
          };
        }
      ]
      ++ haExtra
      ++ modules);

  # A check that could not run here: scripts/nixos-eval prints SKIPPED and the reason.
  skipped = reason: {
    ok = true;
    skipped = reason;
    detail = {};
  };

  # services.pageviews.monitoring with the real prometheus, exporters and grafana modules.
  monitoring = import ./monitoring.nix {
    inherit lib pkgs paths eval module withPackage check skipped failedAssertions root testArgs;
  };
  # The deploy-rs output (deploy.nix).
  rollout = import ./deploy.nix {
    inherit lib pkgs paths check skipped failedAssertions root flake;
  };
in {
  checks = {
    # F1: the postgresql module's own mkDefault is the only definition of the package.
    postgresqlPackage = let
      p = example.config.services.postgresql.package;
    in
      check (p.name == pkgs.postgresql_17.name) {
        package = p.name;
        stateVersion = example.config.system.stateVersion;
      };

    # 1: source-address rules for the backend the host chose, never a changed backend.
    splitDataIptables = iptablesHost dataRules.ipt (split ["data"] {});
    splitDataNftables = nftablesHost [dataRules.nft] (split ["data"] nftables);
    splitAppIptables = iptablesHost appRules.ipt (split ["app"] {});
    splitAppNftables = nftablesHost appRules.nft (split ["app"] nftables);
    splitWithOtherExtraCommands = let
      f = firewallOf (split ["data"] otherIptablesUser);
    in
      check (f.failedAssertions == [] && has "--dport 9999" f.extraCommands && has "--dport 5432" f.extraCommands) f;
    splitFirewallDisabled = let
      f = firewallOf (split ["data"] {networking.firewall.enable = false;});
    in
      check (f.failedAssertions == [] && f.extraCommands == "" && f.extraInputRules == "") f;
    splitFirewalldAsserts = let
      fa = failedAssertions (split ["data"] {imports = backendOption ++ [{networking.firewall.backend = "firewalld";}];});
    in
      check (lib.any (has ''backend is "firewalld"'') fa) {failedAssertions = fa;};

    # 2: in the VM, port 80 redirects to the forwarded HTTPS port, and only one server
    # listens on 80 besides the catch-all default server.
    vmRedirect = let
      conf = nginxConfOf exampleVm;
      forwarded = lib.listToAttrs (map (f: lib.nameValuePair (toString f.guest.port) f.host.port) vmVariant.virtualisation.forwardPorts);
      want = "return 308 https://$host:${toString forwarded."443"}$request_uri;";
    in
      check (noFailedAssertions exampleVm && has want conf && !(has "https://$host$request_uri" conf) && countOf "listen 0.0.0.0:80 ;" conf == 1 && countOf "listen 0.0.0.0:80 default_server ;" conf == 1) {
        inherit want forwarded;
        failedAssertions = failedAssertions exampleVm;
        listen80 = countOf "listen 0.0.0.0:80 ;" conf;
        nginxConf = toString exampleVm.config.environment.etc."nginx/nginx.conf".source;
      };

    # The NixOS vhost has the catch-all default server local.conf has (nix/nginx/catch-all.conf)
    # on 80 and 443, IPv4 and IPv6.
    catchAllServer = let
      conf = nginxConfOf exampleVm;
    in
      check (has "catch-all.conf;" conf
        && lib.all (port: countOf "listen ${port} default_server ;" conf == 1)
        ["0.0.0.0:80" "[::0]:80" "0.0.0.0:443 ssl" "[::0]:443 ssl"]) {
        nginxConf = toString exampleVm.config.environment.etc."nginx/nginx.conf".source;
      };

    # 4: services.pageviews.package without the flake module: a clear assertion without
    # pkgs.pageviews, the overlay's build with it.
    packageWithoutOverlay = let
      fa = failedAssertions (direct {});
    in
      check (lib.any (has "services.pageviews.package has no value") fa) {failedAssertions = fa;};
    packageFromOverlay = let
      ev = direct {inherit (overlaid) pageviews;};
    in
      check (noFailedAssertions ev && ev.config.services.pageviews.package == overlaid.pageviews) {
        failedAssertions = failedAssertions ev;
        package = ev.config.services.pageviews.package.name;
      };

    # The harness's flake summary but its two VM-test fields (its runNixOSTest stub fails on
    # our testScript functions; the vm* checks here evaluate those scripts).
    flakeOutputs = let
      sm = removeAttrs flake.summary ["testNames" "testScriptBytes"];
      want = {
        packages = ["app-image" "default" "pageviews" "pageviews-probe" "sbom" "worker-image"];
        checks = ["audit" "deny" "doc" "sbom" "vm-cluster" "vm-images" "vm-single" "vm-split" "vm-switch"];
      };
    in
      check (builtins.deepSeq sm (sm.exampleFailedAssertions
        == []
        && lib.elem "advisory-db" sm.inputs
        && sm.packages.x86_64-linux == want.packages
        && lib.all (c: lib.elem c sm.checks.x86_64-linux) want.checks))
      sm;
    vmSingle = vmTest "vm-single.nix";
    vmSplit = vmTest "vm-split.nix";
    vmImages = vmTest "vm-images.nix";
    vmCluster = vmTest "vm-cluster.nix";
    vmSwitch = vmTest "vm-switch.nix";
    # vm-switch's premise: switching to its specialisations stops nothing that must stay up;
    # the app setting changes every pageviews unit, the nginx one only what reloads nginx.
    vmSwitchPremise = let
      server = (vmNodes "vm-switch.nix").evs.server;
      children = specialised server;
      r = lib.mapAttrs (_: stoppedBy server) children;
      failed = lib.filterAttrs (_: fa: fa != []) (lib.mapAttrs (_: failedAssertions) children);
    in
      check (failed
        == {}
        && lib.all (x: !lib.any (u: lib.elem u x.stopped) staysUp) (lib.attrValues r)
        && lib.all (u: lib.elem u r.app-setting.changed) ["pageviews-app.service" "pageviews-worker.service" "pageviews-migrate.service"]
        && lib.elem "nginx-config-reload.service" r.nginx-config.changed
        && !lib.elem "nginx.service" r.nginx-config.changed) (r // {failedAssertions = failed;});

    # `nixos-rebuild switch` to a new package, and to a changed setting: app and worker are
    # restarted in place (their socket holds the connections) and nothing stops them; no unit
    # they depend on is stopped with them.
    switchNewPackage = let
      r = stoppedBy (exampleWith [{services.pageviews.package = fakePackage;}]) (exampleWith [{services.pageviews.package = otherPackage;}]);
    in
      check (lib.elem "pageviews-app.service" r.changed && !lib.any (u: lib.elem u r.stopped) staysUp) r;
    switchNewSetting = let
      r = stoppedBy (exampleWith [withPackage]) (exampleWith [withPackage {services.pageviews.settings.RUST_LOG = "debug";}]);
    in
      check (lib.elem "pageviews-app.service" r.changed && !lib.any (u: lib.elem u r.stopped) staysUp) r;
    # A changed nginx configuration is reloaded (nginx-config-reload), nginx itself untouched;
    # the app's group is on the nginx unit, so a change of it restarts nginx (a reload would
    # keep the workers' old groups: 502 on the app's socket).
    switchNginxConfig = let
      r = stoppedBy (exampleWith [withPackage]) (exampleWith [withPackage {services.pageviews.nginx.rateLimit = "20r/s";}]);
      nginx = (exampleWith [withPackage]).config;
    in
      check (lib.elem "nginx-config-reload.service" r.changed
        && !lib.elem "nginx.service" r.changed
        && lib.elem "pageviews-app" nginx.systemd.services.nginx.serviceConfig.SupplementaryGroups
        && !lib.elem "pageviews-app" (nginx.users.users.nginx.extraGroups or [])) (r
        // {
          groups = nginx.systemd.services.nginx.serviceConfig.SupplementaryGroups or null;
        });
    # PostgreSQL restarted (a new minor version, a changed setting): systemd stops what depends
    # on it hard; the app and the worker ride it out with their pool (quick 503s meanwhile).
    postgresqlRestartKeepsTheApp = let
      units = unitsOf example;
      stopped = stopClosure units ["postgresql.service"];
    in
      check (!lib.any (u: lib.elem u stopped) staysUp) {inherit stopped;};

    # The example host (one host) dumps the pageviews database daily by default, as plain SQL
    # without CREATE DATABASE; `database.backup.enable = false` turns it off.
    backupOnByDefault =
      if !builtins.pathExists backupModule
      then skipped "no ${backupModule}"
      else let
        on = (exampleWith [withPackage withGzip backupModule]).config;
        off = (exampleWith [withPackage withGzip backupModule {services.pageviews.database.backup.enable = false;}]).config;
        unit = on.systemd.services.postgresqlBackup-pageviews or null;
      in
        check (unit
          != null
          && lib.toList unit.startAt == ["*-*-* 01:15:00"]
          && has "pg_dump  pageviews" unit.script
          && on.services.postgresqlBackup.location == "/var/backup/postgresql"
          && !(off.systemd.services ? postgresqlBackup-pageviews)) {
          script = unit.script or null;
          startAt = unit.startAt or null;
        };

    # services.pageviews.prometheus: scrape jobs for the app and the worker and the alert
    # rules in a real services.prometheus; without services.prometheus.enable, the assertion.
    prometheusJobs =
      if !builtins.pathExists prometheusModule
      then skipped "no ${prometheusModule}"
      else let
        ev = monitored [prometheusModule {services.prometheus.enable = true;}];
        p = ev.config.services.prometheus;
        jobs =
          map (j: {
            inherit (j) job_name;
            targets = lib.concatMap (s: s.targets) j.static_configs;
          })
          p.scrapeConfigs;
      in
        check (noFailedAssertions ev
          && jobs
          == [
            {
              job_name = "pageviews-app";
              targets = ["127.0.0.1:9102"];
            }
            {
              job_name = "pageviews-worker";
              targets = [ev.config.services.pageviews.settings.PAGEVIEWS_METRICS_LISTEN];
            }
          ]
          && p.ruleFiles == [(root + "/ops/prometheus/alerts.yml")]) {
          inherit jobs;
          ruleFiles = map toString p.ruleFiles;
          failedAssertions = failedAssertions ev;
        };
    prometheusNeedsTheServer =
      if !builtins.pathExists prometheusModule
      then skipped "no ${prometheusModule}"
      else let
        fa = failedAssertions (monitored [prometheusModule]);
      in
        check (lib.any (has "needs services.prometheus.enable") fa) {failedAssertions = fa;};
    # Without services.prometheus declared at all (the harness's module set): the same
    # assertion, not an evaluation error.
    prometheusUndeclared = let
      fa = failedAssertions (monitored []);
    in
      check (lib.any (has "needs services.prometheus.enable") fa) {failedAssertions = fa;};

    # The data tier (vm-ha): every node evaluates with the real patroni, etcd and pgbackrest
    # modules, no assertion fails, and the script gets its constants.
    vmHa =
      if !haCached
      then skipped haMissing
      else vmTestWith haExtra "vm-ha.nix";

    # What Patroni is given on a database host: synchronous replication (not strict by
    # default), every etcd member, passwords only as credentials (never in the YAML), WAL
    # archived by pgBackRest and replicas rebuilt from it.
    haPatroniConfig =
      if !haCached
      then skipped haMissing
      else let
        c = ha.nodes.db1;
        file = c.environment.etc."patroni-pageviews-db1.yaml".source;
        y = builtins.fromJSON (builtins.readFile file);
        unit = c.systemd.services.patroni;
        pg = y.postgresql;
        text = builtins.readFile file;
      in
        check (y.bootstrap.dcs.synchronous_mode
          == true
          && y.bootstrap.dcs.synchronous_mode_strict == false
          && y.etcd3.hosts == map (n: "${haIp n}:2379") haDbs
          && y.restapi.listen == "${haIp "db1"}:8008"
          && pg.listen == "${haIp "db1"}:5432"
          && !(has "vmtest-patroni" text)
          && !(pg.authentication.superuser ? password)
          && c.services.patroni.environmentFiles.PATRONI_SUPERUSER_PASSWORD == "/run/credentials/patroni.service/superuser"
          && lib.all (w: lib.length (lib.filter (lib.hasPrefix "${w}:") unit.serviceConfig.LoadCredential) == 1) ["superuser" "replication" "rewind"]
          && has "archive-push" pg.parameters.archive_command
          && pg.parameters.archive_mode == "on"
          && lib.head pg.create_replica_methods == "pgbackrest"
          && lib.elem "host replication replicator ${haIp "db2"}/32 scram-sha-256" pg.pg_hba
          && lib.elem "host pageviews pageviews-app ${haIp "app"}/32 scram-sha-256" pg.pg_hba
          && !lib.any (has (haIp "proxy")) pg.pg_hba
          && c.services.etcd.initialCluster == map (n: "${n}=http://${haIp n}:2380") haDbs
          && !c.services.etcd.openFirewall) {
          patroni = y;
          loadCredential = unit.serviceConfig.LoadCredential;
          etcdInitialCluster = c.services.etcd.initialCluster;
        };
    # strict mode is the option's to choose.
    haStrictOption =
      if !haCached
      then skipped haMissing
      else let
        c = (haHost [{services.pageviews.database.ha.synchronousStrict = true;}]).config;
        y = builtins.fromJSON (builtins.readFile c.environment.etc."patroni-pageviews-db1.yaml".source);
      in
        check (y.bootstrap.dcs.synchronous_mode_strict == true) {dcs = y.bootstrap.dcs;};

    # The app's DATABASE_URL (built by its start script from the credential) lists every node
    # and asks for the one that accepts writes; its IP allow-list has the three nodes.
    haAppUrl =
      if !haCached
      then skipped haMissing
      else let
        unit = ha.nodes.app.systemd.services.pageviews-app;
        # `%%` in a unit's environment is a `%` (the password comes from the credential).
        url = unit.environment.DATABASE_URL;
        want = "postgres://pageviews-app@${lib.concatMapStringsSep "," (n: "${haIp n}:5432") haDbs}/pageviews?target_session_attrs=read-write&connect_timeout=2";
      in
        check (url
          == want
          && unit.environment.PAGEVIEWS_DATABASE_PASSWORD_FILE == "%d/db-password"
          && lib.all (n: lib.elem (haIp n) unit.serviceConfig.IPAddressAllow) haDbs) {
          inherit want url;
          ipAddressAllow = unit.serviceConfig.IPAddressAllow;
        };

    # The firewall of a database host (iptables backend, the default): PostgreSQL from the app
    # host and the other nodes; Patroni's REST API and etcd from the other nodes only; none of
    # them open to all.
    haFirewall =
      if !haCached
      then skipped haMissing
      else let
        c = ha.nodes.db1;
        fw = c.networking.firewall;
        rule = addr: port: "iptables -w -A nixos-fw -p tcp -s ${addr} --dport ${toString port} -j nixos-fw-accept";
        peers = ["db2" "db3"];
        ports = [8008 2379 2380];
        want = map (a: rule (haIp a) 5432) (["app"] ++ peers) ++ lib.concatMap (a: map (rule (haIp a)) ports) peers;
        unwanted = map (rule (haIp "app")) ports ++ lib.concatMap (a: map (rule (haIp a)) (ports ++ [5432])) ["proxy" "client" "broker" "backup" "db1"];
      in
        check (lib.all (r: has r fw.extraCommands) want
          && !lib.any (r: has r fw.extraCommands) unwanted
          && !lib.any (p: lib.elem p fw.allowedTCPPorts) ([5432] ++ ports)) {
          inherit (fw) extraCommands allowedTCPPorts;
        };

    # pgBackRest on a database host: the SFTP repository with the host key checked strictly,
    # retention, full and diff jobs on timers that run only on the primary; the repository
    # host runs sshd.
    haPgbackrest =
      if !haCached
      then skipped haMissing
      else let
        c = ha.nodes.db1;
        conf = builtins.readFile c.environment.etc."pgbackrest/pgbackrest.conf".source;
        jobs = map (j: "pgbackrest-pageviews-${j}") ["full" "diff"];
      in
        check (lib.all (l: has l conf) [
            "repo1-type=sftp"
            "repo1-sftp-host=${haIp "backup"}"
            "repo1-sftp-host-key-check-type=strict"
            "repo1-sftp-private-key-file=/var/lib/pageviews-pgbackrest/sftp-key"
            "repo1-retention-full=2"
            "[pageviews]"
            "pg1-path=${c.services.patroni.postgresqlDataDir}"
            "pg1-socket-path=/run/patroni"
          ]
          && lib.all (j: has "/primary" c.systemd.services.${j}.serviceConfig.ExecCondition && c.systemd.timers ? ${j}) jobs
          && has "stanza-create" c.systemd.services.pageviews-db-setup.script
          && ha.nodes.backup.services.openssh.enable) {
          inherit conf;
          setup = c.systemd.services.pageviews-db-setup.script;
        };

    # etcd with TLS: the files reach etcd and Patroni as credentials (paths under
    # /run/credentials, never the store), client certificates required, https everywhere.
    haEtcdTls =
      if !haCached
      then skipped haMissing
      else let
        files = lib.genAttrs ["caFile" "certFile" "keyFile"] (f: "/run/secrets/etcd-${f}");
        c = (haHost [{services.pageviews.database.ha.etcd.tls = files;}]).config;
        env = c.systemd.services.etcd.environment;
        y = builtins.fromJSON (builtins.readFile c.environment.etc."patroni-pageviews-db1.yaml".source);
        creds = ["etcd-ca:/run/secrets/etcd-caFile" "etcd-cert:/run/secrets/etcd-certFile" "etcd-key:/run/secrets/etcd-keyFile"];
      in
        check (env.ETCD_KEY_FILE
          == "/run/credentials/etcd.service/etcd-key"
          && env.ETCD_PEER_KEY_FILE == env.ETCD_KEY_FILE
          && env.ETCD_CLIENT_CERT_AUTH == "1"
          && env.ETCD_PEER_CLIENT_CERT_AUTH == "1"
          && lib.hasPrefix "https://" env.ETCD_LISTEN_PEER_URLS
          && y.etcd3.protocol == "https"
          && y.etcd3.key == "/run/credentials/patroni.service/etcd-key"
          && lib.all (cr: lib.elem cr c.systemd.services.etcd.serviceConfig.LoadCredential && lib.elem cr c.systemd.services.patroni.serviceConfig.LoadCredential) creds) {
          inherit env;
          etcd3 = y.etcd3;
        };

    # Impossible combinations fail an assertion: two nodes; HA beside the single-host data
    # role; the database role without HA; a database host missing from the nodes.
    haAssertions =
      if !haCached
      then skipped haMissing
      else let
        fa = modules: failedAssertions (haHost modules);
        cases = {
          twoNodes = fa [
            {
              services.pageviews.database.ha.nodes = lib.mkForce (lib.genList (i: {
                  hostName = "db${toString (i + 1)}";
                  address = "192.168.1.${toString (11 + i)}";
                })
                2);
            }
          ];
          withData = fa [{services.pageviews.roles = lib.mkForce ["database" "data"];}];
          noHa = fa [{services.pageviews.database.ha.enable = lib.mkForce false;}];
          notANode = fa [{networking.hostName = lib.mkForce "db9";}];
          noBackupKey = fa [{services.pageviews.database.pgbackrest.enable = true;}];
        };
        wants = {
          twoNodes = "at least three nodes";
          withData = "also has the `data` role";
          noHa = "is a node of database.ha";
          notANode = "is not in database.ha.nodes";
          noBackupKey = "privateKeyFile";
        };
      in
        check (noFailedAssertions (haHost []) && lib.all (n: lib.any (has wants.${n}) cases.${n}) (lib.attrNames cases)) cases;

    # 5: what the module deploys is what systemd-score scores (ExecStart, ExecStartPre aside: store paths
    # there, a placeholder in the score).
    unitsSingleSource = check (noFailedAssertions example && deployed == scored) {
      onlyDeployed = lib.mapAttrs (n: c: lib.filterAttrs (k: v: (scored.${n}.${k} or null) != v) c) deployed;
      onlyScored = lib.mapAttrs (n: c: lib.filterAttrs (k: v: (deployed.${n}.${k} or null) != v) c) scored;
    };

    # The units exec the binaries themselves (no shell wrapper); the URLs in their environment
    # hold no password, the binaries read it from the credential (`%d/…`, the name
    # LoadCredential= gives it); and `check-config` runs over each unit's environment when the
    # system is built (system.checks), a placeholder standing in for the credentials.
    # NixOS logs natively to the journal; `pageviews-admin` runs `pageviews-app admin` in a
    # transient unit with the app unit's user, credentials and environment (passwords as
    # credential files, none on its command line).
    journaldAndAdminTool = let
      ev = exampleWith [withPackage];
      app = ev.config.systemd.services.pageviews-app;
      admins = lib.filter (p: (p.name or "") == "pageviews-admin") ev.config.environment.systemPackages;
      text = (lib.head admins).text or "";
      credDir = "/run/credentials/pageviews-admin.service";
    in
      check (app.environment.PAGEVIEWS_LOG_FORMAT
        == "journald"
        && lib.length admins == 1
        && has "/bin/pageviews-app admin \"$@\"" text
        && has "--unit=pageviews-admin" text
        && has "'--property=User=pageviews-app'" text
        && lib.all (c: has "'--property=LoadCredential=${c}'" text) (lib.toList app.serviceConfig.LoadCredential)
        && has "'--setenv=PAGEVIEWS_AMQP_PASSWORD_FILE=${credDir}/amqp-password'" text
        && has "'--setenv=PAGEVIEWS_LOG_FORMAT=journald'" text
        && !has "%d/" text
        && builtins.match ".*://[^/@ ]*:[^/@ ]*@.*" text == null) {
        inherit text;
        logFormat = app.environment.PAGEVIEWS_LOG_FORMAT;
      };

    unitsExecTheBinaries = let
      ev = exampleWith [withPackage];
    in
      unitsTakePasswordFiles ev {
        app = {
          DATABASE_URL = "postgres://pageviews-app@/pageviews?host=/run/postgresql";
          AMQP_URL = "amqp://pageviews-app@127.0.0.1:5672/pageviews";
          PAGEVIEWS_AMQP_PASSWORD_FILE = "%d/amqp-password";
        };
        worker.AMQP_URL = "amqp://pageviews-worker@127.0.0.1:5672/pageviews";
        migrate.DATABASE_URL = "postgres://pageviews@/pageviews?host=/run/postgresql";
      };
    splitAppUnitsTakePasswordFiles = unitsTakePasswordFiles (split ["app"] {}) {
      app = {
        DATABASE_URL = "postgres://pageviews-app@192.168.1.3:5432/pageviews";
        PAGEVIEWS_DATABASE_PASSWORD_FILE = "%d/db-password";
        AMQP_URL = "amqp://pageviews-app@192.168.1.3:5672/pageviews";
        PAGEVIEWS_AMQP_PASSWORD_FILE = "%d/amqp-password";
      };
      migrate = {
        DATABASE_URL = "postgres://pageviews@192.168.1.3:5432/pageviews";
        PAGEVIEWS_DATABASE_PASSWORD_FILE = "%d/db-password";
      };
    };

    # services.pageviews.monitoring with the real prometheus, exporters and grafana modules
    # (monitoring.nix).
    inherit (monitoring.checks) monitoringOneHost monitoringNeedsOneHost monitoringUndeclared vmMonitoring;
    # The deploy-rs nodes of the split and cluster hosts, against deploy-rs' schema (deploy.nix).
    inherit (rollout.checks) deployNodes;
  };

  # Scenarios whose generated files scripts/nixos-eval checks with real tools (nginx -t,
  # nft -c), in the harness's report format.
  reports = lib.mapAttrs (_: h.reportOf) ({
      inherit exampleVm;
      splitDataNftables = split ["data"] nftables;
      splitAppNftables = split ["app"] nftables;
    }
    // lib.optionalAttrs (monitoring.checks.monitoringOneHost.skipped or null == null) {
      inherit (monitoring.evals) monitoringOneHost;
    });
}
