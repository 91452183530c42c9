# Backups on the host that runs PostgreSQL: a daily logical backup of the database with
# nixpkgs' services.postgresqlBackup (pg_dump, gzip; today's dump and the previous one in
# /var/backup/postgresql), on by default, so that the simplest deployment is never without
# one. README "Backups and restore" is the restore runbook; vm-single restores a dump.
#
# services.postgresqlBackup is set only where it is declared, as prometheus.nix does with
# services.prometheus: every NixOS system declares it, an evaluation of a subset of NixOS's
# modules (the nixos-eval harness) may not.
{
  config,
  options,
  lib,
  ...
}: let
  cfg = config.services.pageviews;
  common = import ./common.nix {inherit lib cfg;};
  declared = options.services ? postgresqlBackup;
in {
  options.services.pageviews.database.backup.enable = lib.mkOption {
    type = lib.types.bool;
    default = true;
    description = ''
      A daily logical backup (pg_dump, gzip) of the pageviews database on the host that runs
      PostgreSQL, by services.postgresqlBackup: `<location>/<database>.sql.gz` and the
      previous day's `.prev.sql.gz` (location /var/backup/postgresql; time and place are that
      module's `startAt` and `location`). A plain SQL dump without CREATE DATABASE: restore it
      into an empty database owned by the schema owner (README: "Backups and restore").
    '';
  };

  config = lib.mkIf (cfg.enable && common.localData && cfg.database.backup.enable) (lib.optionalAttrs declared {
    services.postgresqlBackup = {
      enable = true;
      databases = [cfg.database.name];
      # No CREATE DATABASE in the dump: it restores into any empty database (the restore
      # drill uses a scratch one).
      pgdumpOptions = "";
    };
  });
}
