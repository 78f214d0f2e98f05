"""Drop-in CREDIT for other trainers. Each integration is imported on its own (`credit.integrations.trl`), so the
package never needs an engine it does not use."""
