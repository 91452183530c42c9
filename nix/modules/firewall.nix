# Firewall: only 80 and 443 open to the world (proxy role). When the stack is split, the
# app port and PostgreSQL/RabbitMQ are open only to the listed peer addresses, through
# nftables rules on the NixOS firewall's input-allow chain. On one host nothing else opens:
# the app is on a Unix socket and the data services listen on loopback.
{
  config,
  lib,
  ...
}: let
  cfg = config.services.pageviews;
  common = import ./common.nix {inherit lib cfg;};
  inherit (common) localApp localData localProxy splitApp splitData;
in {
  config = lib.mkIf cfg.enable {
    networking.firewall.enable = lib.mkDefault true;
    networking.firewall.allowedTCPPorts = lib.mkIf localProxy [80 443];

    # Source-address rules need the nftables backend (extraInputRules).
    networking.nftables.enable = lib.mkIf (splitApp || splitData) true;
    networking.firewall.extraInputRules = lib.mkMerge [
      (lib.mkIf (localApp && splitApp) (common.nftAccept cfg.network.proxyAddresses [cfg.network.appPort]))
      (lib.mkIf (localData && splitData) (common.nftAccept cfg.network.dataClients ([cfg.database.port] ++ lib.optional common.localBroker cfg.rabbitmq.port)))
    ];
  };
}
