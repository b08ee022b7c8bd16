"""DICOM output of cxr's answers for the PACS: structured reports of a study's findings (`cxr_dicom.sr`)."""
