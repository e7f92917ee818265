"""Launching (launch/, docker/, .ci/): SLURM, the Docker image, installation as the README describes it."""
