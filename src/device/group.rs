//! IOMMU group facts.
