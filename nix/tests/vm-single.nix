# The whole stack on one host, as `nixos-rebuild switch` gives it with nothing but
# `services.pageviews.enable` and a certificate: app on a Unix socket, PostgreSQL and
# RabbitMQ on loopback, broker passwords generated at first boot. `client` is the internet.
{
  pkgs,
  module,
  package,
  tls,
  ...
}: let
  shared = import ./nodes.nix {inherit pkgs package tls;};
in {
  name = "pageviews-vm-single";

  nodes = {
    client = shared.client "server";

    server = {
      imports = [module shared.sql shared.tools (shared.sized 2048)];
      services.pageviews = {
        enable = true;
        inherit (tls) domain;
        tls = {
          certificateFile = tls.cert;
          keyFile = tls.key;
        };
      };
    };
  };

  testScript = builtins.readFile ./common.py + builtins.readFile ./vm-single.py;
}
