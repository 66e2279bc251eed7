pub fn vm_test(_a: &[String]) -> crate::Result<()> {
    todo!()
}
pub fn vm_demo(_a: &[String]) -> crate::Result<()> {
    todo!()
}
