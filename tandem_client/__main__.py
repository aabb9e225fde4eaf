"""``python -m tandem_client`` is the ``tandem`` command."""
from tandem_client.cli import main

main()
