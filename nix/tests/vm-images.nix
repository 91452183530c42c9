# The OCI images (`nix build .#app-image`, `.#worker-image`) run by podman through
# virtualisation.oci-containers on `images`, against the module's data role on `data`.
# The migration runs once from the app image (`pageviews-app migrate`) before the
# app and worker containers start.
{
  pkgs,
  module,
  images,
  secrets,
  ...
} @ args: let
  inherit (pkgs) lib;
  shared = import ./nodes.nix args;
  ref = image: "${image.imageName}:${image.imageTag}";
  appRef = ref images.packages.app-image;
  workerRef = ref images.packages.worker-image;

  # KEY=VALUE files for `podman run --env-file` (test-only passwords, see secrets.nix),
  # built from the data host's own settings.
  envFile = nodes: role: who: let
    data = nodes.data.services.pageviews;
    host = shared.ip nodes "data";
  in
    pkgs.writeText "pageviews-vm-test-${who}.env" (''
        DATABASE_URL=postgres://${role}:${secrets.value "db-${who}"}@${host}:${toString data.database.port}/${data.database.name}
      ''
      + lib.optionalString (who != "owner") ''
        AMQP_URL=amqp://${role}:${secrets.value "amqp-${who}"}@${host}:${toString data.rabbitmq.port}/${data.rabbitmq.vhost}
      '');

  # Host networking: the containers reach the data host from the host's own address
  # (the one the data host's firewall and pg_hba allow). Non-root user from the image,
  # read-only root file system, no capabilities.
  hardened = ["--network=host" "--read-only" "--cap-drop=all" "--security-opt=no-new-privileges"];

  # What the script needs to know of the Nix side: the images' ports and the data host's.
  constants = nodes:
    shared.constantsOf {
      data = nodes.data;
      broker = nodes.data;
    }
    // {
      APP_PORT = images.ports.app-image;
      WORKER_METRICS = "127.0.0.1:${toString images.ports.worker-image}";
    };
in {
  name = "pageviews-vm-images";

  nodes = {
    data = {nodes, ...}: {
      imports = [module shared.sql shared.tools (shared.sized 2048)];
      services.pageviews = {
        enable = true;
        roles = ["data"];
        network = {
          dataAddress = shared.ip nodes "data";
          dataClients = [(shared.ip nodes "images")];
        };
        database.passwordFiles = secrets.database;
        rabbitmq.passwordFiles = secrets.rabbitmq;
      };
    };

    images = {
      config,
      nodes,
      ...
    }: {
      imports = [shared.tools (shared.sized 2048)];
      virtualisation.diskSize = 4096;
      virtualisation.oci-containers = {
        backend = "podman";
        containers = {
          pageviews-app = {
            image = appRef;
            imageFile = images.packages.app-image;
            environmentFiles = [(envFile nodes "pageviews-app" "app")];
            extraOptions = hardened;
          };
          pageviews-worker = {
            image = workerRef;
            imageFile = images.packages.worker-image;
            environmentFiles = [(envFile nodes "pageviews-worker" "worker")];
            extraOptions = hardened;
          };
        };
      };

      # The schema first: `pageviews-app migrate` from the app image, as the owner role,
      # retried until the data host answers.
      systemd.services.pageviews-image-migrate = {
        description = "pageviews: migrations from the app image";
        wantedBy = ["multi-user.target"];
        wants = ["network-online.target"];
        after = ["network-online.target"];
        path = [config.virtualisation.podman.package];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          TimeoutStartSec = "10min";
        };
        script = ''
          podman load -i ${images.packages.app-image}
          for _ in $(seq 90); do
            if podman run --rm --pull=never --network=host --read-only --cap-drop=all \
              --env-file ${envFile nodes "pageviews" "owner"} ${appRef} migrate; then
              exit 0
            fi
            sleep 2
          done
          exit 1
        '';
      };
      systemd.services.podman-pageviews-app = {
        requires = ["pageviews-image-migrate.service"];
        after = ["pageviews-image-migrate.service"];
      };
      systemd.services.podman-pageviews-worker = {
        requires = ["pageviews-image-migrate.service"];
        after = ["pageviews-image-migrate.service"];
      };
    };
  };

  testScript = shared.script ./vm-images.py constants;
}
