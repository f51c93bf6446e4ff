"""webhooks: business events delivered as signed JSON POSTs (see ``plugin``)."""
