# A deploy as `nixos-rebuild switch` makes it, under load: `server` runs the whole stack and
# carries two specialisations, one with a changed app setting (every pageviews unit changes,
# as with a new package) and one with a changed nginx configuration; the script switches to
# each with switch-to-configuration while `client` sends about 200 requests/s (the nixpkgs
# nginx test's pattern). nix/eval/scenarios.nix (`vmSwitch`, `switchNewPackage`) checks the
# premise without a VM: no unit that must stay up is stopped by these switches.
args: let
  shared = import ./nodes.nix args;

  constants = nodes:
    shared.constantsOf {stack = nodes.server;}
    // {
      # 25 addresses of the client x 8 requests/s each: 200 requests/s, every address below
      # the per-client limit.
      LOAD_ADDRESSES = 25;
      LOAD_RATE = "8/s";
      RATE_LIMIT = nodes.server.services.pageviews.nginx.rateLimit;
      SPECIALISATIONS = builtins.attrNames nodes.server.specialisation;
    };
in {
  name = "pageviews-vm-switch";

  nodes = {
    client = {
      imports = [(shared.client "server") shared.tools];
    };

    server = {
      imports = [shared.stack];
      specialisation = {
        app-setting.configuration.services.pageviews.settings.RUST_LOG = "info,pageviews=debug";
        nginx-config.configuration.services.pageviews.nginx.burst = 40;
      };
    };
  };

  testScript = shared.script ./vm-switch.py constants;
}
