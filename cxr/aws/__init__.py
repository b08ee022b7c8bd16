"""The AWS side of cxr: IAM policy documents generated from configuration."""
