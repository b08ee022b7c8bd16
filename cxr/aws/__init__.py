"""The AWS side of cxr, all through boto3: SageMaker spot training (`training_job`, `local_training`),
SageMaker Model Registry (`model_registry`), endpoints and releases (`endpoints`, `deploy`, `smoke`), and
least-privilege IAM policy documents (`iam`)."""
