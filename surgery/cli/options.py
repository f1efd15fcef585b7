"""Click options shared by several commands, defined once (this module imports nothing heavy)."""

from __future__ import annotations

import click

drop_option = click.option(
    "--drop", type=click.Choice(["low", "high"]),
    help="Drop the experts with the lowest or highest signal (default: the criterion's own, listed by "
         "`moe-surgery criteria`; the similarity signals mcs-ews, mcs-eas, mcs-ets and mcs-egs drop high). "
         "Not for recon or auto.")
