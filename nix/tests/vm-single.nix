# The whole stack on one host, as `nixos-rebuild switch` gives it with nothing but
# `services.pageviews.enable` and a certificate: app on a Unix socket, PostgreSQL and
# RabbitMQ on loopback, broker passwords generated at first boot. `client` is the internet.
args: let
  shared = import ./nodes.nix args;

  # What the script needs to know of the Nix side, from the nodes themselves.
  constants = nodes:
    shared.constantsOf {stack = nodes.server;}
    // {
      PUBLIC_PORTS = nodes.server.networking.firewall.allowedTCPPorts;
    };
in {
  name = "pageviews-vm-single";

  nodes = {
    client = shared.client "server";
    server = shared.stack;
  };

  testScript = shared.script ./vm-single.py constants;
}
