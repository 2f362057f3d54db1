"""The report side: tables over run folders (`tables`: `camloc report`, Table S1/S3 layouts), the HTML
report (`html`), figures (`figures`: explain's pictures, overlays, IoU plots) and method comparison
statistics (`compare`)."""
