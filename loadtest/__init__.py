"""Load testing apserve over HTTP: Locust shapes, the runner behind `apserve loadtest`, reports and plots."""
